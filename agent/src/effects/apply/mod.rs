//! Apply a plan as one transaction: every target ends up either fully old
//! or fully new, whatever instant the process dies at, and a commit counts
//! as applied only once its health checks passed and its record is durable.
//!
//! 1. **Intent**: the quick-check record (`quick.delta`) is removed, `tx/<txid>/inventory.before.json`
//!    and `tx/<txid>/intent.json` (the journal, `Preparing`) are written.
//! 2. **Back up** each existing target into `tx/<txid>/backups/` by hard
//!    link (free; the old inode survives the rename), or by copy across
//!    filesystems. A file taken over for the first time is also copied to
//!    `originals/` once.
//! 3. **Stage** each new file as `.driftless-<n>-<txid>` next to its
//!    target, with final owner and mode; create missing parents. The
//!    journal (`Prepared`: every entry, the created directories, what
//!    systemd must be told) is written to its temp name.
//! 4. **Flush (1)**: one `syncfs` per filesystem (targets and state), not an
//!    `fsync` per file. Then the journal is renamed to `journal.json` and
//!    **flush (2)**, an `fsync` of `tx/<txid>/`, makes that name durable.
//! 5. **Switch**: rename each staged file over its target, change
//!    owner/mode in place for metadata-only changes, unlink pruned files;
//!    mark the transaction `switched` (an empty file) and **flush (3)**
//!    ([`apply`] returns here).
//! 6. The caller reloads units and runs the health checks. Then either
//!    **commit** ([`commit`]): atomically replace `inventory.json` with one
//!    naming this transaction (the commit point; with it the anti-rollback
//!    record), or **revert** ([`revert`]). A committed transaction is
//!    marked `committed` (an empty file).
//!
//! Recovery ([`recover()`], at the start of every run, under the lock) rolls
//! back every transaction that did not reach the commit point, including
//! one that was switched in while its checks ran or was being reverted.
//! Why back, not forward: the old files are the last state that was
//! verified on this host, while new files that no check has passed are
//! not known to work. Rolling back returns to the verified state, and the
//! following sync re-applies the new commit through the whole pipeline
//! (write, reload, check). A rolled-back `Switched` transaction reports the
//! unit actions it had asked for, so the caller can tell systemd again
//! about the restored files.
//!
//! The backups of the latest committed transaction are kept until the
//! next one commits.
//!
//! # Durability barriers, and why these are enough
//!
//! A `kill -9` loses nothing the process wrote (the page cache survives
//! it); a power loss loses every write that no barrier (`fsync`,
//! `fdatasync`, `syncfs`) covered, in any order and any subset, and a file
//! written but not synced may come back empty or torn. The ordering below
//! is what power loss needs; the kill campaign (`tests/integration/
//! crash_windows.rs`) checks the same state machine against kills. On one
//! filesystem a change costs **5 barriers** whatever its size (it was 19:
//! 16 `fsync`, 2 `syncfs`, 1 `fdatasync`); with the state on another
//! filesystem than the targets, flushes (1), (3) and the commit's two
//! count once per filesystem.
//!
//! | barrier | makes durable | needed before |
//! |---|---|---|
//! | flush (1): `syncfs` per filesystem | staged files (data, owner, mode, name), backups, created directories, `inventory.before.json`, the journal's temp file, the removal of `quick.delta` | the journal's rename: a `journal.json` whose name survives has a complete content and complete companions |
//! | flush (2): `fsync` of `tx/<txid>/` | the name `journal.json` | the first target is touched |
//! | flush (3): `syncfs` per filesystem | the renames, in-place owner/mode changes and unlinks of the switch, and the `switched` mark | the checks run (a check that kills the host must be counted, see `marks`) and the commit record |
//! | commit: `fsync` of the temp inventory, or with a new anti-rollback record one `syncfs` per filesystem for both temp files | the contents of the commit record (and of the floor) | their renames: never a torn inventory or floor |
//! | commit: `fsync` of the state directory, or with a floor one `syncfs` per filesystem | the commit point (and the floor's new name) | the run reports "applied" |
//!
//! What each removed barrier was, and why dropping it weakens nothing:
//!
//! - **`quick.delta` removal** (the quick-check record) (an `fsync` of the state directory): the
//!   record must not survive a power loss once a target may have changed;
//!   flush (1) precedes the first rename and covers the state filesystem.
//! - **`inventory.before.json`** (file and directory `fsync`): it is read
//!   only through a `journal.json`, which is renamed into place after
//!   flush (1) made this file complete and durable.
//! - **The `Preparing` journal** (file and directory `fsync`), now
//!   `intent.json` without a barrier: while `journal.json` does not exist,
//!   flush (2) has not returned and no target was touched, so rolling back
//!   means deleting staged files only. After a kill the intent is always
//!   complete and names them (as before). After a power loss *during
//!   staging* it may be missing or torn; recovery then removes the
//!   transaction's directory, no managed file having changed, and the
//!   hidden `.driftless-<n>-<txid>` files staged before the loss may be
//!   left beside their targets (logged). Those are the only difference a
//!   power loss can make, and they are never a managed file.
//! - **The `Prepared` journal's directory `fsync`, its `fsync` before the
//!   rename**: both replaced by flush (1) then flush (2), which also cover
//!   the staged files, so the journal costs one barrier of its own.
//! - **The `Switched` journal rewrite** (file and directory `fsync`): a
//!   rewritten journal is torn if its rename survives a power loss and its
//!   data does not, so it needed its own barrier before the rename. The
//!   `switched` mark is an empty file, which cannot be torn; flush (3)
//!   makes it durable with the renames it vouches for. What it recorded
//!   besides the state (the unit actions) is in the `Prepared` journal.
//! - **The `Committed` journal rewrite** (file and directory `fsync`):
//!   recovery treats a transaction named by the inventory as committed
//!   whatever its journal says, so after the durable inventory the
//!   `committed` mark needs no barrier of its own. It must be durable
//!   before another transaction's commit could make the inventory name
//!   someone else (else a pruned directory that came back would read as
//!   interrupted): that transaction's flush (1) covers the state
//!   filesystem long before its commit.
//! - **The `fsync` of `tx/` after pruning**: a pruned directory that comes
//!   back is marked `committed` (or says `Committed`/`RolledBack`), and
//!   recovery leaves it alone until the next commit prunes it again.
//! - **The anti-rollback record's own two `fsync`s**: written to its temp
//!   name before the commit, it shares the commit's barriers (renamed just
//!   after the inventory, both names durable at the second one). A power
//!   loss between the two renames and that barrier can keep the new floor
//!   and lose the inventory: the transaction is then rolled back while the
//!   floor names its commit, which passed its checks and which the next
//!   sync applies again. That floor is higher than the old order could
//!   leave, never lower: it refuses nothing but commits older than one
//!   this host verified.
//! - **The history line's `fdatasync`**: see [`crate::effects::state::history`].
//!
//! Rename after data: every file that a name makes visible (staged file,
//! journal, inventory, floor) had its data synced before the rename, so a
//! surviving name never points to a torn file. Directory after rename: the
//! renames of the switch are synced (flush 3) before the commit record is
//! written, and the commit record's name is synced before the run reports
//! success. The rest of the run (quick-check record, `last-run.json`,
//! history) is written without a barrier: caches and reports, never read
//! by recovery.

mod intent;
pub mod journal;
pub mod originals;
mod recover;
mod stage;
mod undo;

#[cfg(test)]
pub(crate) use intent::txid_at;
use intent::*;
pub use recover::*;
use stage::*;
use undo::*;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::fcntl::{openat, renameat, OFlag};
use nix::sys::stat::{fchmod, fstat, fstatat, Mode as NixMode, SFlag};
use nix::unistd::{fchown, linkat, unlinkat, Gid, Uid, UnlinkatFlags};

use crate::desired::spec::TargetPath;
use crate::effects::rootfs::{MkParents, RootFs};
use crate::effects::state::{quick, read_json_large, StateDir};
use crate::plan::dirs::DirAction;
use crate::plan::inventory::Inventory;
use crate::plan::links::LinkAction;
use crate::plan::{ChangeKind, FileChange, Plan};
use journal::{Journal, JournalEntry, Meta, Op, PostActions, TxState};

use super::failpoint;

/// Knobs for tests.
#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// Test hook: abort the process (like `kill -9`) after this many
    /// switch operations (renames/unlinks/chmods).
    pub crash_after: Option<usize>,
}

/// What a committed transaction did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    pub txid: String,
    pub created: usize,
    pub changed: usize,
    pub removed: usize,
}

const JOURNAL: &str = "journal.json";
const INTENT: &str = "intent.json";
const SWITCHED: &str = "switched";
const COMMITTED: &str = "committed";
const INVENTORY_BEFORE: &str = "inventory.before.json";
/// The records of `inventory.delta` that `inventory.before.json` (a link to
/// the base) needs, copied: the log itself is appended to.
const INVENTORY_BEFORE_LOG: &str = "inventory.before.delta";
const INVENTORY: &str = "inventory.json";

/// The inventory a transaction started from (kept with the latest
/// committed transaction): `None` once the transaction is pruned.
pub fn inventory_before(state: &StateDir, txid: &str) -> Result<Option<Inventory>> {
    crate::effects::state::read_inventory_at(
        &state.tx_dir().join(txid).join(INVENTORY_BEFORE),
        INVENTORY_BEFORE_LOG,
    )
}

/// Applies `plan` and commits `plan.next_inventory`. On error before the
/// commit point, the transaction is rolled back before returning.
/// `tx/<txid>/inventory.before.json`: a hard link to `inventory.json`,
/// whose bytes `before` was just read from. `inventory.json` is only ever
/// replaced by a rename, never rewritten in place, so the link keeps the
/// old inventory byte for byte, and costs nothing where encoding it again
/// cost tens of milliseconds at 10,000 files (issue 18). The records of
/// `inventory.delta` it was read with (`log`), which is appended to in
/// place, are copied beside it as `inventory.before.delta`. Without an
/// inventory yet (or where links fail) it is written whole from `before`.
fn save_inventory_before(
    state: &StateDir,
    tx_dir: &Path,
    before: &Inventory,
    log: &crate::effects::state::inventory_log::LogState,
) -> Result<()> {
    let dest = tx_dir.join(INVENTORY_BEFORE);
    match fs::hard_link(state.inventory_path(), &dest) {
        Ok(()) if log.valid_len == 0 => Ok(()),
        Ok(()) => state.copy_log(log, &tx_dir.join(INVENTORY_BEFORE_LOG)),
        Err(e) => {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::debug!(
                    "cannot link the inventory into {}: {e}; writing it",
                    tx_dir.display()
                );
            }
            crate::effects::state::write_inventory_replace(&dest, before)
        }
    }
}

/// The saved originals of the files `plan` stops managing. Only entries
/// with an original are looked up in the next inventory: a one-file sync
/// at 10,000 files searched it for every entry, 140,000 path comparisons
/// for a list that is usually empty (issue #18).
fn released_originals(before: &Inventory, plan: &Plan) -> Vec<String> {
    before
        .files
        .iter()
        .filter_map(|(path, entry)| Some((path, entry.original.as_ref()?)))
        .filter(|(path, _)| !plan.next_inventory.files.contains_key(*path))
        .map(|(_, original)| original.stored.clone())
        .collect()
}

pub fn apply(
    fs: &RootFs,
    state: &StateDir,
    plan: &Plan,
    ownership: bool,
    now: i64,
    opts: &ApplyOptions,
) -> Result<Applied> {
    apply_with(fs, state, &mut plan.clone(), ownership, now, opts, None)
}

/// Plans the files again after the packages stage changed the host (a
/// package may have installed a file the plan thought missing).
pub type Replan<'a> = &'a mut dyn FnMut() -> Result<Plan>;

/// [`apply`], and when the plan's packages stage changes anything, the
/// files are planned again with `replan` (their part of `plan` replaced,
/// the journal's intent rewritten) before anything is staged.
pub fn apply_with(
    fs: &RootFs,
    state: &StateDir,
    plan: &mut Plan,
    ownership: bool,
    now: i64,
    opts: &ApplyOptions,
    replan: Option<Replan<'_>>,
) -> Result<Applied> {
    let timing = crate::timings::stage("write");
    // No barrier of its own: flush (1) below makes the removal durable
    // before any target is touched.
    quick::clear_unsynced(state)?;
    let txid = new_txid();
    let tx_dir = state.tx_dir().join(&txid);
    let backups = tx_dir.join("backups");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&backups)
        .with_context(|| format!("cannot create {}", backups.display()))?;
    let (before, before_log) = state.inventory_and_log()?;
    restore_with_saved_meta(state, plan);
    // Read only through a `journal.json`, which exists only after flush (1)
    // made this file's content durable.
    save_inventory_before(state, &tx_dir, &before, &before_log)?;

    // No commit recorded: a first sync, or an inventory lost (rebuilt by
    // state repair, or deleted): the originals saved before are kept.
    let keep_saved = before.txid.is_empty();
    let mut journal = Journal {
        saved_originals: new_originals(state, plan),
        txid: txid.clone(),
        state: TxState::Preparing,
        commit: plan.commit.clone(),
        created_at: now,
        entries: intent(plan, &txid),
        created_dirs: Vec::new(),
        ownership,
        post: None,
        released_originals: released_originals(&before, plan),
        kept: Vec::new(),
        packages: (ownership && !plan.packages.is_empty()).then(|| plan.package_record.clone()),
        accounts: (ownership && !plan.accounts.is_empty()).then(|| {
            crate::plan::accounts::AccountsRecord::of(&plan.accounts, plan.account_lines.clone())
        }),
    };
    crate::effects::state::write_state_replace(
        &tx_dir.join(INTENT),
        &journal,
        journal_format(&journal),
    )?;
    // The accounts stage: users and groups exist before any file is
    // staged with them as owner.
    let staged = (|| {
        if journal.accounts.is_some() {
            accounts_stage(fs, state, &tx_dir, &mut journal)?;
        }
        if journal.packages.is_some() {
            packages_stage(state, &tx_dir, &mut journal)?;
            if let Some(replan) = replan {
                let again = replan().context("cannot plan the files again after the packages")?;
                for d in plan.replace_files(again) {
                    tracing::info!("planned again after the packages: {d}");
                }
                restore_with_saved_meta(state, plan);
                journal.entries = intent(plan, &txid);
                journal.released_originals = released_originals(&before, plan);
                journal.saved_originals = new_originals(state, plan);
                // Durable: a torn intent after the packages stage would
                // lose the record its undo needs.
                write_intent_durably(&tx_dir, &journal)?;
            }
        }
        anyhow::Ok(())
    })();
    if let Err(e) = staged {
        if let Err(re) = rollback(fs, state, &mut journal) {
            return Err(e.context(format!(
                "and rolling back transaction {txid} failed too: {re:#}; the next run retries the rollback"
            )));
        }
        if !journal.kept.is_empty() {
            return Err(e.context(format!(
                "transaction {txid} rolled back; not undone: {}",
                journal.kept.join("; ")
            )));
        }
        return Err(e);
    }
    let mut dirs: BTreeMap<String, OwnedFd> = BTreeMap::new();
    let staged = prepare(
        fs,
        state,
        plan,
        &backups,
        &mut journal,
        &mut dirs,
        keep_saved,
    );
    // Staged and backed up: what follows works from the files on disk.
    // Freed before the journal is encoded, which may then reuse the memory.
    if staged.is_ok() {
        plan.release_contents();
    }
    let plan: &Plan = plan;
    let prepared = staged.and_then(|()| {
        failpoint::hit("apply.staged")?;
        journal.state = TxState::Prepared;
        // What systemd must be told if the files change back: recorded
        // now, used only once the transaction is switched in.
        journal.post = Some(post_actions(plan));
        // The journal's temp file; renamed to `journal.json` after flush (1).
        let tx_fd = open_state_subdir(&tx_dir)?;
        let bytes = crate::effects::state::encode_state(&journal, journal_format(&journal))?;
        let (tmp, _) = crate::effects::rootfs::write_temp_in(&tx_fd, JOURNAL, &bytes, 0o600)
            .with_context(|| format!("cannot write the journal in {}", tx_dir.display()))?;
        Ok((tx_fd, tmp))
    });
    drop(timing);
    let (tx_fd, journal_tmp) = match prepared {
        Ok(p) => p,
        Err(e) => {
            let _ = rollback(fs, state, &mut journal);
            return Err(e);
        }
    };
    let switched = timed("flush", || flush(fs, state, &dirs))
        .and_then(|()| {
            renameat(&tx_fd, journal_tmp.as_str(), &tx_fd, JOURNAL)
                .context("cannot put the journal in place")?;
            timed("flush", || {
                nix::unistd::fsync(&tx_fd).context("cannot fsync the transaction directory")
            })
        })
        .and_then(|()| timed("switch", || switch(&journal, &dirs, opts)))
        .and_then(|()| failpoint::hit("apply.switched"))
        .and_then(|()| mark(&tx_fd, SWITCHED))
        .and_then(|()| timed("flush", || flush(fs, state, &dirs)));
    if let Err(e) = switched {
        if let Err(re) = rollback(fs, state, &mut journal) {
            return Err(e.context(format!(
                "and rolling back transaction {txid} failed too: {re:#}; the next run retries the rollback"
            )));
        }
        return Err(e.context(format!("transaction {txid} rolled back")));
    }
    journal.state = TxState::Switched;

    let mut applied = Applied {
        txid,
        ..Default::default()
    };
    for c in &plan.changes {
        match c.kind {
            ChangeKind::Create => applied.created += 1,
            ChangeKind::Update => applied.changed += 1,
            ChangeKind::Remove => applied.removed += 1,
            ChangeKind::Adopt => {}
        }
    }
    for c in &plan.links {
        match c.action {
            LinkAction::Create => applied.created += 1,
            LinkAction::Retarget => applied.changed += 1,
            LinkAction::Remove => applied.removed += 1,
        }
    }
    applied.removed += plan.absent.len();
    for c in &plan.dirs {
        match c.action {
            DirAction::Create => applied.created += 1,
            DirAction::Meta => applied.changed += 1,
            // Removed after the commit, and only if empty.
            DirAction::Remove => {}
        }
    }
    Ok(applied)
}

/// The mark, in a transaction's directory, that its accounts stage began:
/// only then may an undo remove accounts (before it, an account of the
/// record that exists was made by something else).
const ACCOUNTS_STARTED: &str = "accounts-started";

/// Creates the journal's accounts: checks they are still missing (what
/// appeared since the plan is not this transaction's: the record is
/// dropped and nothing is undone), makes the intent and the
/// `accounts-started` mark durable (a power loss after sysusers must not
/// lose the record), runs sysusers, and records the ids it really gave
/// before comparing them with the plan's, so an undo removes what was
/// made.
fn accounts_stage(
    fs: &RootFs,
    state: &StateDir,
    tx_dir: &Path,
    journal: &mut Journal,
) -> Result<()> {
    let Some(record) = journal.accounts.clone() else {
        return Ok(());
    };
    failpoint::hit("apply.accounts.started")?;
    if let Err(e) = crate::effects::accounts::still_missing(fs, &record) {
        journal.accounts = None;
        return Err(e);
    }
    stage_started(state, tx_dir, journal, ACCOUNTS_STARTED)?;
    let made = crate::effects::accounts::create(fs, &record);
    // What sysusers made, whatever it was: the undo works from this.
    if let Ok(real) = crate::effects::accounts::made(fs, &record) {
        if real != record {
            journal.accounts = Some(real);
            write_intent_durably(tx_dir, journal)?;
        }
    }
    made?;
    failpoint::hit("apply.accounts.done")
}

/// The mark that apt finished (a crash after it is not the stage's).
const PACKAGES_DONE: &str = "packages-done";

/// How many runs try a packages undo that fails before it is given up
/// (and reported in the history).
const PACKAGE_UNDO_TRIES: u32 = 3;

/// The transaction's intent, replaced durably (once a stage that changes
/// the host outside the file switch may begin, a torn intent would lose
/// the record its undo needs).
fn write_intent_durably(tx_dir: &Path, journal: &Journal) -> Result<()> {
    crate::effects::state::write_state_atomic(
        &tx_dir.join(INTENT),
        journal,
        journal_format(journal),
    )
}

/// Before a stage that changes the host outside the file switch (sysusers,
/// apt): the intent naming what it will do, and the mark `started` that
/// allows its undo, made durable, with the transaction's own directory
/// entry (a power loss after the tool ran must not lose the record).
fn stage_started(state: &StateDir, tx_dir: &Path, journal: &Journal, started: &str) -> Result<()> {
    write_intent_durably(tx_dir, journal)?;
    let tx_fd = open_state_subdir(tx_dir)?;
    mark(&tx_fd, started)?;
    nix::unistd::fsync(&tx_fd).context("cannot fsync the transaction directory")?;
    nix::unistd::fsync(&open_dir_path(&state.tx_dir())?)
        .context("cannot fsync the transactions directory")
}

/// Installs, changes and removes the journal's packages: checks apt
/// would still do what the plan showed, saves the versions it replaces
/// into `debs/` (for the undo), makes the `packages-started` mark
/// durable, runs apt, and records durably what dpkg says apt did.
fn packages_stage(state: &StateDir, tx_dir: &Path, journal: &mut Journal) -> Result<()> {
    let Some(mut record) = journal.packages.clone() else {
        return Ok(());
    };
    let budget = crate::effects::packages::Budget::new(
        "packages stage",
        crate::effects::packages::STAGE_BUDGET,
    );
    failpoint::hit("apply.packages.started")?;
    let before = crate::effects::packages::prepare(&record, &tx_dir.join("debs"), &budget)?;
    stage_started(state, tx_dir, journal, crate::effects::packages::STARTED)?;
    let changed = crate::effects::packages::change(&mut record, &before, &budget);
    if journal.packages.as_ref() != Some(&record) {
        journal.packages = Some(record);
        write_intent_durably(tx_dir, journal)?;
    }
    changed?;
    // Past this mark, a crash is no longer the packages stage's: it does
    // not count toward marking the commit bad as one.
    let _ = fs::File::create(tx_dir.join(PACKAGES_DONE));
    failpoint::hit("apply.packages.done")
}

/// What systemd must be told after the files of `plan` change (or change
/// back).
pub fn post_actions(plan: &Plan) -> PostActions {
    PostActions {
        daemon_reload: plan
            .changes
            .iter()
            .map(|c| &c.path)
            .chain(plan.links.iter().map(|c| &c.path))
            .chain(plan.absent.iter().map(|c| &c.path))
            .any(|p| crate::effects::systemd::is_unit_file(p.as_str())),
        unit_actions: plan.unit_actions.clone(),
    }
}

/// The commit point of a switched-in transaction: replaces the inventory
/// with `next` naming `txid`, durably. Call only after the unit actions and
/// health checks passed. On error the transaction is still switched in and
/// uncommitted: the caller must [`revert`] it.
///
/// `floor`, a new anti-rollback record already written to its temp name,
/// is put in place with the inventory and made durable by the same
/// barriers (see the module docs); on error it is discarded.
///
/// `next` becomes the inventory recorded (named after `txid`, with the
/// time and the directories this transaction created): updated in place,
/// since a copy of 10,000 entries cost more than the rest of a one-file
/// commit's bookkeeping. On error it is half updated: revert, and do not
/// use it.
pub fn commit(
    fs: &RootFs,
    state: &StateDir,
    txid: &str,
    next: &mut Inventory,
    now: i64,
    floor: Option<crate::effects::state::floor::Pending>,
    changed: Option<&std::collections::BTreeSet<crate::desired::spec::TargetPath>>,
) -> Result<()> {
    let _t = crate::timings::stage("commit");
    let tx_dir = state.tx_dir().join(txid);
    let journal = load_journal(&tx_dir)?
        .with_context(|| format!("the journal of transaction {txid} is missing"))?;
    if journal.state != TxState::Switched {
        bail!(
            "transaction {txid} is {:?}, not switched in: it cannot be committed",
            journal.state
        );
    }
    let inv = next;
    inv.txid = txid.to_string();
    inv.applied_at = now;
    inv.dirs.extend(journal.created_dirs.iter().cloned());
    failpoint::hit("apply.commit.inventory")?;
    write_commit_record(state, inv, floor, changed)
        .context("cannot record the applied commit in the inventory")?;
    // Committed from here on: the inventory names the transaction, and
    // recovery treats it as committed whatever its journal says.
    failpoint::hit("apply.commit.journal")?;
    let tx_fd = open_state_subdir(&tx_dir)?;
    mark(&tx_fd, COMMITTED)?;
    prune_old_transactions(state, txid)?;
    // Files released (their originals restored): the copies are done.
    for stored in &journal.released_originals {
        originals::retire(state, stored);
    }
    remove_unneeded_dirs(fs, state, inv);
    Ok(())
}

/// The commit record: `inventory.json` replaced atomically, or one record
/// appended to `inventory.delta` for a large inventory (see
/// `effects::state::inventory_log`), and, with `floor`, the anti-rollback
/// record put beside it; durable on return.
///
/// Without a floor: appended, `fdatasync` of the log (1 barrier; 2 when
/// it is created); whole, `fsync` of the temp file, rename, `fsync` of
/// the state directory (2). With one: the record appended or the
/// inventory's temp file written, and the floor's temp file, one `syncfs`
/// per filesystem (their contents durable), renamed (the inventory
/// first), one `syncfs` per filesystem again (the names durable): 2
/// barriers when the state and the root share a filesystem, instead of 4.
fn write_commit_record(
    state: &StateDir,
    inv: &Inventory,
    floor: Option<crate::effects::state::floor::Pending>,
    changed: Option<&std::collections::BTreeSet<crate::desired::spec::TargetPath>>,
) -> Result<()> {
    use crate::effects::state::{inventory_log, InventoryWrite};
    let Some(floor) = floor else {
        return state.save_inventory(inv);
    };
    let state_fd = open_dir_path(state.path())?;
    let whole = match state.prepare_inventory_hinted(inv, changed)? {
        InventoryWrite::Whole(bytes) => {
            let (tmp, _) =
                crate::effects::rootfs::write_temp_in(&state_fd, INVENTORY, &bytes, 0o600)
                    .with_context(|| {
                        format!("cannot write {}", state.inventory_path().display())
                    })?;
            let written = syncfs_each([state_fd.as_fd(), floor.dir()]).and_then(|()| {
                renameat(&state_fd, tmp.as_str(), &state_fd, INVENTORY)
                    .with_context(|| format!("cannot replace {}", state.inventory_path().display()))
            });
            if let Err(e) = written {
                let _ = unlinkat(&state_fd, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
                return Err(e);
            }
            true
        }
        InventoryWrite::Truncate => {
            inventory_log::truncate(&state_fd, &state.log_path())?;
            syncfs_each([state_fd.as_fd(), floor.dir()])?;
            false
        }
        InventoryWrite::Append { line, log } => {
            let (file, _) = inventory_log::append(&state_fd, &log, &line, &state.log_path())?;
            let synced = failpoint::hit("state.inventory.appended")
                .and_then(|()| syncfs_each([state_fd.as_fd(), floor.dir()]));
            if let Err(e) = synced {
                let _ = file.set_len(log.valid_len);
                return Err(e);
            }
            false
        }
    };
    let dir = floor.dir_fd()?;
    if let Err(e) = floor.install() {
        // The commit is not at stake: the next sync raises the floor.
        tracing::warn!("cannot record the anti-rollback floor: {e:#}");
    }
    syncfs_each([state_fd.as_fd(), dir.as_fd()])?;
    if whole {
        failpoint::hit("state.inventory.replaced")?;
    }
    // A log beside a base just replaced names the old base: removed now
    // that the new base is durable (ignored if this does not happen).
    if whole {
        inventory_log::remove(&state_fd);
    }
    Ok(())
}

/// One `syncfs` per filesystem among `fds`.
fn syncfs_each<'a>(fds: impl IntoIterator<Item = std::os::fd::BorrowedFd<'a>>) -> Result<()> {
    let mut seen = std::collections::BTreeSet::new();
    for fd in fds {
        let dev = fstat(fd).context("cannot stat a directory")?.st_dev;
        if seen.insert(dev) {
            nix::unistd::syncfs(fd).context("syncfs failed")?;
        }
    }
    Ok(())
}

/// Records a state transition as an empty file in the transaction's
/// directory: an empty file cannot be torn by a power loss, so (unlike a
/// rewritten journal) it needs no barrier before it is trusted; it
/// becomes durable at the next barrier of the transaction.
fn mark(tx_fd: &OwnedFd, name: &str) -> Result<()> {
    match openat(
        tx_fd,
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        NixMode::from_bits_truncate(0o600),
    ) {
        Ok(_) | Err(Errno::EEXIST) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot record the transaction as {name}")),
    }
}

/// The journal of the transaction in `tx_dir` and the state it reached,
/// or `None` when nothing was recorded (a crash before the intent).
///
/// `journal.json` is written once, before the first target is touched,
/// and rewritten only to say `Reverting` or `RolledBack` (durably). Until
/// it exists, `intent.json` (state `Preparing`) names what may have been
/// staged. Past `Prepared`, the state is told by empty marker files:
/// `switched` (every target switched in and flushed) and `committed`
/// (the inventory named this transaction). A journal of an older
/// driftless, which rewrote the state in place, reads as it is.
/// The names a journal gives for files of its own (its transaction, its
/// backups, its staged files) are single names in their directories:
/// the state directory is untrusted, and a planted journal whose backup
/// was `../../../../etc/shadow` had that file hard-linked over a target
/// and its mode set by a rollback, one whose staged name held `../` had
/// a rollback unlink any file. Such a journal is refused as corrupt.
fn check_names(tx_dir: &Path, journal: &Journal) -> Result<()> {
    let plain = |n: &str| !n.is_empty() && n != "." && n != ".." && !n.contains(['/', '\0']);
    let dir = tx_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    if journal.txid != dir {
        bail!(
            "{}: the journal names transaction {:?}, not its own directory's {dir:?}: it is corrupt",
            tx_dir.join(JOURNAL).display(),
            journal.txid
        );
    }
    for e in &journal.entries {
        for (what, name) in [("backup", &e.backup), ("staged file", &e.staged)] {
            if let Some(name) = name.as_deref().filter(|n| !plain(n)) {
                bail!(
                    "{}: the entry of {} names the {what} {name:?}, which is not a file name of its own: the journal is corrupt",
                    tx_dir.join(JOURNAL).display(),
                    e.path
                );
            }
        }
    }
    Ok(())
}

pub fn load_journal(tx_dir: &Path) -> Result<Option<Journal>> {
    let Some(mut journal) = read_json_large::<Journal>(&tx_dir.join(JOURNAL))? else {
        // No `journal.json`: flush (2) had not returned, so no target was
        // touched. The intent was written without a barrier: after a
        // power loss it may be missing or torn, and then there is nothing
        // to undo but staged files it would have named (see the module
        // docs).
        return Ok(match read_json_large::<Journal>(&tx_dir.join(INTENT)) {
            Ok(Some(j)) => {
                check_names(tx_dir, &j)?;
                Some(j)
            }
            Ok(None) => None,
            // A newer agent's intent may name what this one cannot undo:
            // refused, never treated as torn.
            Err(e) if crate::effects::state::is_newer_format(&e) => return Err(e),
            // After a stage's mark, the intent was made durable before
            // sysusers or apt ran: unreadable, it is damage, not a torn
            // write, and what it recorded must not be thrown away.
            Err(e)
                if tx_dir.join(ACCOUNTS_STARTED).exists()
                    || tx_dir.join(crate::effects::packages::STARTED).exists() =>
            {
                return Err(e.context(format!(
                    "the intent of transaction {} is unreadable, but users, groups or packages were already changed by it",
                    tx_dir.display()
                )))
            }
            Err(e) => {
                tracing::warn!(
                    "the intent of an interrupted transaction in {} is unreadable ({e:#}); no target was touched, but files staged as `.driftless-*` next to targets may be left",
                    tx_dir.display()
                );
                None
            }
        });
    };
    check_names(tx_dir, &journal)?;
    if matches!(journal.state, TxState::Prepared | TxState::Switched) {
        if tx_dir.join(COMMITTED).exists() {
            journal.state = TxState::Committed;
        } else if tx_dir.join(SWITCHED).exists() {
            journal.state = TxState::Switched;
        }
    }
    Ok(Some(journal))
}

/// Removes the directories driftless created that no managed file needs
/// any more, if they are empty (something else may have put files there:
/// then they stay, and are tried again after the next commit). Best
/// effort, after the commit point: a crash here leaves an empty directory
/// until the next commit, never a missing one.
fn remove_unneeded_dirs(fs: &RootFs, state: &StateDir, inv: &mut Inventory) {
    let mut removed = false;
    for d in inv.unneeded_dirs() {
        let gone = match fs.open_parent(&d, None) {
            Ok(None) => true,
            Ok(Some(parent)) => match unlinkat(&parent, d.file_name(), UnlinkatFlags::RemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => true,
                // Not empty, or no longer a directory (ENOTDIR: a file or
                // link took its place): not ours to remove.
                Err(Errno::ENOTEMPTY) | Err(Errno::EEXIST) => false,
                Err(Errno::ENOTDIR) => true,
                Err(e) => {
                    tracing::warn!("cannot remove the empty directory {}: {e}", fs.display(&d));
                    false
                }
            },
            // A link or file now sits above it: forget it.
            Err(_) => true,
        };
        if gone {
            tracing::debug!(dir = %d, "removed a directory no managed file needs");
            inv.dirs.remove(&d);
            removed = true;
        }
    }
    if removed {
        if let Err(e) = state.save_inventory(inv) {
            tracing::warn!("cannot update the inventory after removing directories: {e:#}");
        }
    }
}

fn timed<T>(stage: &'static str, f: impl FnOnce() -> T) -> T {
    let _t = crate::timings::stage(stage);
    f()
}

#[cfg(test)]
mod tests;
