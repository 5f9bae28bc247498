//! What a run does after the transactions a crash left were rolled back
//! (`apply::recover`): history, units told again, commits whose checks
//! were interrupted too often marked bad, and the operator's rollbacks
//! remembered from the anti-rollback record.

use tokio::runtime::Handle;
use tracing::warn;

use super::deploy::kept_suffix;
use super::marks::{self, Marks};
use super::post;
use super::runlog::record;
use crate::config::Settings;
use crate::effects::apply;
use crate::effects::state::history::Outcome;
use crate::effects::state::StateDir;
use crate::exit::{Classify, Error, Failure};
use crate::plan::diff::short;

/// What a crash left behind is rolled back by [`apply::recover`]; this
/// finishes the job. Each rolled-back transaction is recorded in the
/// history. One that was switched in had told systemd to reload or
/// restart units: they are told again, for the restored files (if that
/// fails, the host is in a state nobody verified, and the agent halts).
/// Commits the operator rolled back from are kept in the anti-rollback
/// record too: after the state directory is wiped (and its marks with it),
/// they are marked bad again here, so the next sync does not re-apply
/// what the operator rolled back.
pub(super) fn remember_rollbacks(
    settings: &Settings,
    state: &StateDir,
    marks: &mut Marks,
) -> Result<(), Error> {
    let Ok(Some(f)) = super::floor::load(&settings.root) else {
        return Ok(());
    };
    let mut added = false;
    for c in &f.rolled_back {
        if !marks.bad.contains_key(c) {
            marks.bad.insert(
                c.clone(),
                marks::Mark {
                    time: f.recorded_at,
                    reason: "rolled back by the operator (remembered in the anti-rollback record)"
                        .into(),
                },
            );
            added = true;
        }
    }
    if added {
        marks::save(state, marks).kind(Failure::Failed)?;
    }
    Ok(())
}

/// A commit whose checks were interrupted [`marks::MAX_INTERRUPTED`]
/// times is marked bad; below that, the next sync simply tries again.
pub(super) fn after_recovery(
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
            _ if r.packages_interrupted => "interrupted during its packages stage",
            _ => "interrupted before all its files were switched in",
        };
        warn!(txid = %r.txid, commit = %commit, "rolled back a transaction {what}; the host is back at its last verified state");
        crate::events::outcome(
            Outcome::Recovered,
            r.commit.as_deref(),
            Some(&r.txid),
            Some(what),
        );
        record(
            state,
            now,
            Outcome::Recovered,
            r.commit.clone(),
            Some(r.txid.clone()),
            None,
            Some(format!(
                "transaction {what}: rolled back{}",
                kept_suffix(&r.kept)
            )),
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
                    lifted_by: None,
                });
                changed = true;
            }
        }
        if let (true, Some(c)) = (
            r.phase == TxState::Switched || r.packages_interrupted,
            &r.commit,
        ) {
            let n = marks.interrupted.entry(c.clone()).or_insert(0);
            *n = n.saturating_add(1);
            if *n >= marks::MAX_INTERRUPTED {
                let n = *n;
                marks.interrupted.remove(c);
                warn!(commit = %short(c), times = n, "commit marked bad: its packages stage, unit actions or checks were interrupted every time");
                marks.bad.insert(
                    c.clone(),
                    marks::Mark {
                        time: now,
                        reason: format!(
                            "its packages stage, unit actions or health checks were interrupted {n} times (the agent was killed or the host went down each time)"
                        ),
                    },
                );
            }
            changed = true;
        }
    }
    // A revert whose restored state was not checked (it, or its checks,
    // were cut short; recovery above finished it): checked now, as a
    // revert's always is. The commit was marked bad when the revert began:
    // without this, the host would stay at a state nothing verified, and
    // the next syncs would find nothing to do. Until the check is done the
    // mark stays, so a kill during it only means checking again.
    if let Some(unchecked) = marks.unchecked_revert.clone() {
        if marks.halted.is_none() {
            if let Some(failure) = super::deploy::check_restored(settings, state, rt) {
                warn!(commit = %short(&unchecked.commit), "the state restored by reverting it fails its checks: {failure}");
                marks.halted = Some(marks::Halt {
                    time: now,
                    commit: Some(unchecked.commit.clone()),
                    reason: format!(
                        "commit {} was reverted, but the restored state fails its checks too: {failure}",
                        short(&unchecked.commit)
                    ),
                    lifted_by: None,
                });
            }
        }
        // A halt supersedes it: the operator looks at the host.
        marks.unchecked_revert = None;
        changed = true;
    }
    if changed {
        marks::save(state, marks).kind(Failure::Failed)?;
    }
    Ok(())
}
