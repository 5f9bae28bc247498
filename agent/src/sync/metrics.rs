//! The numbers of a run for [`crate::effects::metrics`]: gathered from
//! the pass (lock wait, marks, checks) and its result, once the outcome is
//! recorded.

use std::time::{Duration, Instant};

use super::marks::Marks;
use super::run::Pass;
use super::Report;
use super::Reverted;
use crate::config::Settings;
use crate::effects::metrics::{self, Labels, Run, Target};
use crate::effects::state::StateDir;
use crate::exit::{Error, Failure};
use crate::plan::ChangeKind;

/// After a sync (or a rollback): adds it to the counters and writes the
/// textfile. Never fails the run.
pub(super) fn after_run(pass: &Pass, result: &Result<Report, Error>) {
    let Some(path) = &pass.settings.metrics_file else {
        return;
    };
    let mut run = base(
        pass.now,
        pass.started,
        pass.lock_wait,
        &pass.marks,
        "failed",
    );
    run.secrets_decrypted = pass.secrets_decrypted as u64;
    run.checks_failing = pass.checks_failing.map(|n| n as u64);
    run.reboot_required = pass.reboot_pending;
    match result {
        Ok(r) if r.skipped_bad || r.waiting.is_some() => run.result = "skipped",
        Ok(r) => {
            run.result = if r.applied.is_some() {
                "applied"
            } else {
                "unchanged"
            };
            run.applied_commit = Some(r.commit.clone());
            let kept = r
                .plan
                .changes
                .iter()
                .filter(|c| c.kind != ChangeKind::Remove)
                .count();
            run.files_managed = Some((r.plan.unchanged + kept) as u64);
            if let Some(a) = &r.applied {
                run.changed = (a.created + a.changed) as u64;
                run.pruned = a.removed as u64;
                run.drifted = r.plan.drifted as u64;
            }
        }
        Err(e) => run.result = result_of(e),
    }
    emit(pass.settings, &pass.state, path, &run);
}

/// A run refused at the start because the agent is halted: the metrics
/// still say that it ran, and that it is halted.
pub(super) fn while_halted(
    settings: &Settings,
    state: &StateDir,
    now: i64,
    started: Instant,
    lock_wait: Option<Duration>,
    marks: &Marks,
) {
    if let Some(path) = &settings.metrics_file {
        let run = base(now, started, lock_wait, marks, "degraded");
        emit(settings, state, path, &run);
    }
}

fn base(
    now: i64,
    started: Instant,
    lock_wait: Option<Duration>,
    marks: &Marks,
    result: &'static str,
) -> Run {
    Run {
        time: now,
        duration: started.elapsed(),
        result,
        bad_commits: marks.bad.len() as u64,
        halted: marks.halted.is_some(),
        lock_wait,
        boot_id: crate::effects::reboot::boot_id(),
        ..Run::default()
    }
}

/// The result label of a failed run (as history records it).
fn result_of(e: &Error) -> &'static str {
    match e.kind {
        Failure::InvalidRepo | Failure::Refused => "refused",
        Failure::Degraded => "degraded",
        _ if e.error.downcast_ref::<Reverted>().is_some() => "reverted",
        _ => "failed",
    }
}

fn emit(settings: &Settings, state: &StateDir, path: &std::path::Path, run: &Run) {
    let target = Target {
        path,
        root: (!settings.live).then_some(settings.root.as_path()),
    };
    let labels = Labels {
        branch: settings.branch.clone(),
        interval: settings.interval,
        splay: settings.splay,
        version: env!("CARGO_PKG_VERSION"),
    };
    metrics::write(&target, state, run, &labels);
}
