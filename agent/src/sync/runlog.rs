//! What a run leaves for `status` and `history`: one history line per run
//! that did something, and `last-run.json` for every run.

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::effects::apply::Applied;
use crate::effects::state::history::{Entry, Outcome};
use crate::effects::state::{read_json_large, write_json_replace, StateDir};

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

#[allow(clippy::too_many_arguments)]
pub(super) fn record(
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
    // A failure that repeats on every poll (the same refusal, a commit
    // marked bad that the host runs) is entered once: at one line per
    // poll the trimmed history would soon hold nothing else, and a
    // rollback finds its previous good commit there. `last-run.json`
    // says it happened again.
    let repeat = outcome != Outcome::Applied
        && state.last_history().ok().flatten().is_some_and(|last| {
            last.outcome == entry.outcome
                && last.commit == entry.commit
                && last.message == entry.message
        });
    if !repeat {
        if let Err(e) = state.append_history(&entry) {
            warn!("cannot record history: {e:#}");
        }
    }
    write_last_run(state, now, outcome, commit, message);
}

pub(super) fn write_last_run(
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
    if let Ok(Some(prev)) = read_json_large::<LastRun>(&path) {
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
    let Some(mut last) = read_json_large::<LastRun>(&path)? else {
        return Ok(None);
    };
    if let Ok(m) = std::fs::metadata(&path) {
        use std::os::unix::fs::MetadataExt;
        last.time = last.time.max(m.mtime());
    }
    Ok(Some(last))
}
