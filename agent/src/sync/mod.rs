//! One pass of the pipeline: fetch → load → render → plan → apply → record.
//!
//! `plan` runs the same [`prepare`] and stops before applying, so what it
//! prints is exactly what `sync` would do. Every failure carries its exit
//! code ([`crate::exit::Failure`]); every stop before the commit point
//! leaves the host as it was.
//!
//! Where each step lives: `run` drives a pass (lock, recovery, the
//! phases, the record of its outcome); `fetching` gets the commit and its
//! tree; `planning` loads, renders and plans; `quick` and `repair` are the
//! quick check and the partial sync it allows; `deploy` stages, switches,
//! runs `post` (unit actions, hooks, checks: before the commit point),
//! then commits or reverts; `recovery` follows the rollback of what a
//! crash left; `rollback` applies an earlier commit. `fleet`, `reboot`,
//! `stick` and `bundle` are the rollout gate, reboots, and air-gapped
//! sources; `marks`, `runlog` and `metrics` are what a pass records.

pub mod bundle;
mod deploy;
mod fetching;
mod fleet;
mod fleetlock;
pub mod marks;
mod metrics;
mod planning;
pub mod post;
pub mod quick;
mod reboot;
pub mod reboot_permit;
mod recovery;
pub mod repair;
mod rollback;
mod run;
mod runlog;
pub mod state_repair;
pub mod stick;

use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use crate::config::Settings;
use crate::desired::snapshot::Snapshot;
use crate::desired::spec::TargetPath;
use crate::effects::apply::{Applied, ApplyOptions};
use crate::effects::fetch;
use crate::effects::rootfs::RootFs;
use crate::effects::state::{floor, LockGuard, StateDir};
use crate::exit::{Classify, Error, Failure};
use crate::plan::Plan;
pub use deploy::Reverted;
pub use fetching::*;
pub use planning::*;
pub use rollback::*;
pub use run::sync_once;
pub use runlog::{load_last_run, LastRun};

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

#[derive(Debug, Clone, Default)]
pub struct SyncOptions {
    /// How long to wait for another run's lock.
    pub wait: Duration,
    pub apply: ApplyOptions,
    /// Apply a commit marked bad, and clear the halted flag.
    pub retry: bool,
    /// Skip the quick check: render and compare every file.
    pub full: bool,
    /// The commit the previous pass of this process already said "nothing
    /// to do" for, at INFO (the daemon's idle polls): saying it again for
    /// the same commit goes to DEBUG, so an idle host's journal does not
    /// get a line per poll (1,440 a day at a one-minute interval).
    pub idle_logged: Option<String>,
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
    /// `[fleet]`: the fetched commit is new, and this host may not apply
    /// it yet (or its rollout is halted); nothing was touched.
    pub waiting: Option<crate::effects::fleet::Waiting>,
}

impl Report {
    /// The pass found the host matching its commit and changed nothing
    /// (the "nothing to do" of [`SyncOptions::idle_logged`]).
    pub fn idle(&self) -> bool {
        self.applied.is_none()
            && !self.skipped_bad
            && self.waiting.is_none()
            && self.plan.is_empty()
    }

    /// Ends the report's life at the end of a one-pass run: its plan's
    /// next inventory and set of self-contained files (a run's largest
    /// allocations at 10,000 files) go to [`crate::memory::discard`]; the
    /// rest, which may hold rendered secrets, is dropped (and zeroized).
    pub fn discard(mut self) {
        crate::memory::discard(std::mem::take(&mut self.plan.next_inventory));
        crate::memory::discard(std::mem::take(&mut self.plan.self_contained));
    }
}

/// Opens (creating) the state directory. Under a `--root` prefix it is,
/// by default, inside the root, which may be a hostile image: its path is
/// then walked from a handle on the root without following any symlink (a
/// link at `var/lib/driftless` would otherwise put the agent's state, and
/// its lock, anywhere on the host).
pub fn open_state(settings: &Settings) -> anyhow::Result<StateDir> {
    // Lexically normalised, as the reserved paths are: the walk below
    // resolves no `..` through a link, and the directory opened is the
    // one walked.
    let root = lexical(&settings.root);
    let dir = lexical(&settings.state_dir);
    if root != Path::new("/") {
        if let Ok(rel) = dir.strip_prefix(&root) {
            let target = TargetPath::parse(&format!("/{}", rel.display()))
                .map_err(|e| anyhow::anyhow!("state_dir {}: {e}", settings.state_dir.display()))?;
            RootFs::open(&root)?.ensure_dir(&target, 0o700)?;
            return StateDir::open(&dir);
        }
    }
    StateDir::open(&settings.state_dir)
}

/// Opens the state directory and takes the lock.
pub fn lock(settings: &Settings, wait: Duration) -> Result<(StateDir, LockGuard), Error> {
    let state = open_state(settings).kind(Failure::Failed)?;
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
