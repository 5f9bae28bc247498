//! `driftless rollback` and the rollback a failed fleet gate asks for:
//! which earlier commit is good, and its apply through the same pipeline
//! as a sync.

use tokio::runtime::Handle;

use anyhow::anyhow;
use tracing::warn;

use crate::config::Settings;
use crate::effects::fetch;
use crate::effects::state::history::Outcome;
use crate::effects::state::{floor, StateDir};
use crate::exit::{Classify, Error, Failure};
use crate::plan::diff::short;

use super::deploy::deploy;
use super::run::{self, begin};
use super::runlog::record;
use super::{
    gather_facts, marks, metrics, plan_for, source_spec, verify_signatures, Fetched, Prepared,
    Report, SyncOptions,
};

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
    // The operator's rollback also resumes a halted agent (once it is
    // about to apply: a rollback refused early leaves the halt in place).
    let opts = SyncOptions::default();
    let mut pass = begin(settings, &opts, now, rt, true)?;
    let result = rollback_in(&mut pass, to, "rolled back by the operator");
    metrics::after_run(&pass, &result);
    result
}

/// The newest commit of the history applied before, that is not
/// `current` and not marked bad here: where a rollback goes by default.
pub(super) fn previous_good(
    pass: &run::Pass,
    current: Option<&str>,
) -> Result<Option<String>, Error> {
    let history = pass.state.history().kind(Failure::Failed)?;
    Ok(history
        .iter()
        .rev()
        .filter(|e| e.outcome == Outcome::Applied)
        .filter_map(|e| e.commit.clone())
        .find(|c| Some(c.as_str()) != current && !pass.marks.bad.contains_key(c)))
}

/// May the fleet roll this host back from `current` by itself?
pub(super) enum RollbackEligibility {
    Yes,
    /// Nothing earlier in the history to return to.
    NoEarlierCommit,
    /// `current` was itself reached by a rollback (the operator's or the
    /// fleet's): one automatic step is the limit.
    ReachedByRollback,
    /// A rollback from `current` was tried and its target failed its
    /// checks there (and was reverted): that was the one step. (One that
    /// failed before, on a pre hook, SIGTERM or I/O, is tried again.)
    RollbackFailed,
}

pub(super) fn rollback_eligibility(
    pass: &run::Pass,
    current: &str,
) -> Result<RollbackEligibility, Error> {
    let history = pass.state.history().kind(Failure::Failed)?;
    let at = history
        .iter()
        .rposition(|e| e.outcome == Outcome::Applied && e.commit.as_deref() == Some(current));
    let reached = at.map(|i| &history[i]);
    // A rollback that failed since `current` was applied: it stayed, and
    // trying the next older commit on every poll would walk the host down
    // its whole history, one transaction (and its restarts) at a time.
    let since = at.map_or(&history[..0], |i| &history[i + 1..]);
    if since.iter().any(|e| {
        e.outcome == Outcome::Failed
            && e.commit.as_deref() == Some(current)
            && e.message
                .as_deref()
                .is_some_and(|m| m.starts_with(ROLLBACK_REVERTED))
    }) {
        return Ok(RollbackEligibility::RollbackFailed);
    }
    if reached.is_some_and(|e| {
        e.message
            .as_deref()
            .is_some_and(|m| m.starts_with("rollback from"))
    }) {
        return Ok(RollbackEligibility::ReachedByRollback);
    }
    Ok(match previous_good(pass, Some(current))? {
        Some(_) => RollbackEligibility::Yes,
        None => RollbackEligibility::NoEarlierCommit,
    })
}

/// A rollback within a pass that holds the lock: to `to`, or the previous
/// good commit of the history. `why` is the bad mark's reason for the
/// commit rolled back from. Records the outcome in the history.
/// A commit of the mirror, read as a sync reads the fetched one (its
/// signatures checked again when they are required).
pub(super) fn fetched_commit(
    settings: &Settings,
    state: &StateDir,
    commit: &str,
) -> Result<Fetched, Error> {
    let spec = source_spec(settings)?;
    let repo = fetch::open(&spec, &state.mirror()).kind(Failure::Failed)?;
    let id = repo
        .rev_parse_single(commit)
        .map_err(|e| {
            Error::new(
                Failure::Failed,
                anyhow!("{commit:?} is not a commit of the repository: {e}"),
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
    let snapshot = fetch::read_tree(&repo, id, &settings.path, settings.limits.file)
        .kind(Failure::InvalidRepo)?;
    Ok(Fetched {
        commit: id.to_string(),
        commit_time,
        summary: String::new(),
        snapshot,
    })
}

pub(super) fn rollback_in(
    pass: &mut run::Pass,
    to: Option<&str>,
    why: &str,
) -> Result<Report, Error> {
    // A rollback is a transaction: SIGTERM waits for it (see `crate::stop`).
    let _critical = crate::stop::critical();
    let (settings, now) = (pass.settings, pass.now);
    let inventory = pass.state.inventory().kind(Failure::Failed)?;
    let current = inventory.commit.clone();
    let target = match to {
        Some(t) => t.to_string(),
        None => previous_good(pass, current.as_deref())?.ok_or_else(|| {
            Error::new(
                Failure::Failed,
                anyhow!("no earlier good commit in the history: name one with --to COMMIT"),
            )
        })?,
    };
    let mut fetched = fetched_commit(settings, &pass.state, &target)?;
    if current.as_deref() == Some(fetched.commit.as_str()) {
        // Nothing to roll back, and nothing a rollback would check: a halt
        // lifted here would be lifted on a state nothing verified.
        return Err(Error::new(
            Failure::Usage,
            anyhow!(
                "commit {} is already this host's applied commit: nothing to roll back to (`driftless sync --retry` applies and checks it again)",
                short(&fetched.commit)
            ),
        ));
    }
    fetched.summary = format!("rollback to {}", short(&fetched.commit));
    let commit_time = fetched.commit_time;
    let facts = gather_facts(&pass.fs);
    let plan = plan_for(settings, &pass.state, &pass.fs, &fetched, &facts)?;
    // Durable before the rollback commits (a crash after it must not
    // re-apply the commit rolled back from), and taken back if the
    // rollback fails: the host stays on that commit, whose drift is still
    // to be repaired.
    let marked_before = current
        .as_ref()
        .and_then(|c| pass.marks.bad.get(c).cloned());
    if let Some(cur) = current.as_ref() {
        pass.marks.bad.insert(
            cur.clone(),
            marks::Mark {
                time: now,
                reason: format!("{why} to {}", short(&fetched.commit)),
            },
        );
    }
    pass.marks.bad.remove(&fetched.commit);
    // A halt stays until the rollback applied: one whose pre hook failed,
    // or whose target failed its checks, fixed nothing. Noted with the
    // target, durably before the transaction: a kill after its commit
    // lifts the halt at the next run.
    if let Some(h) = pass.marks.halted.as_mut() {
        h.lifted_by = Some(fetched.commit.clone());
    }
    marks::save(&pass.state, &pass.marks).kind(Failure::Failed)?;
    let prepared = Prepared { fetched, plan };
    // A target that changes no file here is recorded (after its checks)
    // as a commit that does (see `deploy::adopt_unchanged`).
    let result = deploy(pass, prepared).and_then(|mut r| {
        if r.idle() {
            super::deploy::adopt_unchanged(pass, &mut r, false)?;
        }
        Ok(r)
    });
    match &result {
        Ok(r) => {
            if let Err(e) = crate::effects::failpoint::hit("rollback.applied") {
                warn!("{e:#}");
            }
            if pass.marks.halted.take().is_some() {
                if let Err(e) = marks::save(&pass.state, &pass.marks) {
                    warn!("cannot lift the halt in the marks: {e:#}");
                }
            }
            // The operator (or the fleet) lowered the floor on purpose.
            let full_ref =
                fetch::full_ref_name(&settings.branch).unwrap_or_else(|_| settings.branch.clone());
            let mut rolled_back = floor::load(&settings.root)
                .ok()
                .flatten()
                .map_or_else(Vec::new, |f| f.rolled_back_without(&r.commit));
            if let Some(cur) = current.as_ref().filter(|c| **c != r.commit) {
                rolled_back.retain(|c| c != cur);
                rolled_back.push(cur.clone());
            }
            let excess = rolled_back.len().saturating_sub(floor::MAX_ROLLED_BACK);
            rolled_back.drain(..excess);
            let lowered = floor::Floor {
                commit: r.commit.clone(),
                commit_time,
                branch: full_ref,
                recorded_at: now,
                rolled_back,
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
        Err(e) => {
            if let Some(cur) = current.as_ref() {
                match marked_before {
                    Some(m) => pass.marks.bad.insert(cur.clone(), m),
                    None => pass.marks.bad.remove(cur),
                };
            }
            if let Some(h) = pass.marks.halted.as_mut() {
                h.lifted_by = None;
            }
            if let Err(e) = marks::save(&pass.state, &pass.marks) {
                warn!("cannot take back the rollback's marks: {e:#}");
            }
            // A target that failed its checks (and was reverted) is the
            // one step `rollback_eligibility` allows; a failure before
            // (a pre hook, SIGTERM, I/O) is not.
            let prefix = if e.error.downcast_ref::<super::Reverted>().is_some() {
                ROLLBACK_REVERTED
            } else {
                "rollback"
            };
            record(
                &pass.state,
                now,
                Outcome::Failed,
                current.clone(),
                None,
                None,
                Some(format!("{prefix}: {:#}", e.error)),
            )
        }
    }
    result
}

/// How the history says a rollback's target failed its checks and was
/// reverted (the entry names the commit rolled back from).
const ROLLBACK_REVERTED: &str = "rollback reverted";
