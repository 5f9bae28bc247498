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
//! Recovery ([`recover`], at the start of every run, under the lock) rolls
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

pub mod journal;
pub mod originals;

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
        released_originals: before
            .files
            .iter()
            .filter(|(path, _)| !plan.next_inventory.files.contains_key(*path))
            .filter_map(|(_, entry)| entry.original.as_ref().map(|o| o.stored.clone()))
            .collect(),
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
                journal.released_originals = before
                    .files
                    .iter()
                    .filter(|(path, _)| !plan.next_inventory.files.contains_key(*path))
                    .filter_map(|(_, entry)| entry.original.as_ref().map(|o| o.stored.clone()))
                    .collect();
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
    let plan: &Plan = plan;
    let mut dirs: BTreeMap<String, OwnedFd> = BTreeMap::new();
    let prepared = prepare(
        fs,
        state,
        plan,
        &backups,
        &mut journal,
        &mut dirs,
        keep_saved,
    )
    .and_then(|()| {
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
    write_commit_record(state, inv, floor)
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
) -> Result<()> {
    use crate::effects::state::{inventory_log, InventoryWrite};
    let Some(floor) = floor else {
        return state.save_inventory(inv);
    };
    let state_fd = open_dir_path(state.path())?;
    let whole = match state.prepare_inventory(inv)? {
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

/// A new transaction's id: `<unix seconds>-<nanoseconds, 8 hex
/// digits>-<pid>`, so that ids sort in the order transactions began
/// (`state check` tells a stale inventory by a transaction committed after
/// the one it names).
fn new_txid() -> String {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    txid_at(since_epoch)
}

/// [`new_txid`] at `since_epoch`. Both parts of the time come from that
/// one reading: the seconds were once the run's start and the nanoseconds
/// read at the transaction, so a run that began in one second and staged
/// its transaction in the next got an id below an earlier transaction's
/// of that first second (and `state check`, under load, missed a deleted
/// `inventory.delta`).
pub(crate) fn txid_at(since_epoch: std::time::Duration) -> String {
    format!(
        "{}-{:08x}-{}",
        since_epoch.as_secs(),
        since_epoch.subsec_nanos(),
        std::process::id()
    )
}

/// The staged file of the `index`th change: short and independent of the
/// target's name (`.<name>.driftless-<txid>` overflowed NAME_MAX for a
/// 240-character file name). The journal records it, so recovery needs no
/// rule to find it.
fn staged_name(index: usize, txid: &str) -> String {
    format!(".driftless-{index}-{txid}")
}

fn parent_key(path: &TargetPath) -> String {
    match path.as_str().rsplit_once('/') {
        Some((p, _)) => p.to_string(),
        None => String::new(),
    }
}

/// The journal entries of a plan, computed before any I/O so the intent
/// is on disk before the first byte is staged.
fn intent(plan: &Plan, txid: &str) -> Vec<JournalEntry> {
    plan.changes
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let meta = |mode, uid, gid| Meta { mode, uid, gid };
            let old = c.before.as_ref().map(|b| meta(b.mode, b.uid, b.gid));
            let mut new = c.after.as_ref().map(|a| meta(a.mode, a.uid, a.gid));
            let staged = Some(staged_name(i, txid));
            let (op, staged) = match c.kind {
                ChangeKind::Adopt => (Op::Adopt, None),
                ChangeKind::Create | ChangeKind::Update if c.content_changed => {
                    (Op::Replace, staged)
                }
                ChangeKind::Create | ChangeKind::Update => (Op::Meta, None),
                ChangeKind::Remove => match &c.restore_original {
                    Some(o) => {
                        new = Some(meta(o.mode, o.uid, o.gid));
                        (Op::Replace, staged)
                    }
                    None => (Op::Remove, None),
                },
            };
            let backup = (c.before.is_some() && op != Op::Adopt).then(|| i.to_string());
            JournalEntry {
                path: c.path.clone(),
                op,
                staged,
                backup,
                old,
                new,
                link: None,
                old_link: None,
            }
        })
        .chain(path_intent(plan, txid))
        .chain(dir_intent(plan, txid))
        .collect()
}

/// The journal entries of the managed directories to create or correct,
/// after the links' and absent paths' (a directory leaving the
/// repository has none: it is removed after the commit, if empty).
fn dir_intent<'a>(plan: &'a Plan, txid: &'a str) -> impl Iterator<Item = JournalEntry> + 'a {
    let first = plan.changes.len() + plan.links.len() + plan.absent.len();
    let meta = |m: crate::plan::dirs::DirMeta| Meta {
        mode: m.mode,
        uid: m.uid,
        gid: m.gid,
    };
    plan.dirs
        .iter()
        .filter(|c| c.action != DirAction::Remove)
        .enumerate()
        .map(move |(j, c)| {
            let (op, staged) = match c.action {
                DirAction::Create => (Op::Mkdir, Some(staged_name(first + j, txid))),
                _ => (Op::DirMeta, None),
            };
            JournalEntry {
                path: c.path.clone(),
                op,
                staged,
                backup: None,
                old: c.was.map(meta),
                new: Some(meta(c.meta)),
                link: None,
                old_link: None,
            }
        })
}

/// The journal entries of the links, then the absent paths, after the
/// files' (indices, hence staged and backup names, continue theirs).
fn path_intent<'a>(plan: &'a Plan, txid: &'a str) -> impl Iterator<Item = JournalEntry> + 'a {
    let first = plan.changes.len();
    let link_meta = |owner: Option<(u32, u32)>| {
        owner.map(|(uid, gid)| Meta {
            mode: 0o777,
            uid,
            gid,
        })
    };
    let links = plan.links.iter().map(move |c| (c, link_meta(c.was_owner)));
    let links = links.enumerate().map(move |(j, (c, old))| {
        let i = first + j;
        match c.action {
            LinkAction::Create | LinkAction::Retarget => JournalEntry {
                path: c.path.clone(),
                op: Op::Link,
                staged: Some(staged_name(i, txid)),
                backup: None,
                old,
                new: None,
                link: c.target.clone(),
                old_link: c.was.clone(),
            },
            LinkAction::Remove => JournalEntry {
                path: c.path.clone(),
                op: Op::Remove,
                staged: None,
                backup: None,
                old,
                new: None,
                link: None,
                old_link: c.was.clone(),
            },
        }
    });
    let first = first + plan.links.len();
    let absent = plan.absent.iter().enumerate().map(move |(j, c)| {
        let i = first + j;
        match (&c.file, &c.link) {
            (Some(f), _) => JournalEntry {
                path: c.path.clone(),
                op: Op::Remove,
                staged: None,
                backup: Some(i.to_string()),
                old: Some(Meta {
                    mode: f.mode,
                    uid: f.uid,
                    gid: f.gid,
                }),
                new: None,
                link: None,
                old_link: None,
            },
            (None, link) => JournalEntry {
                path: c.path.clone(),
                op: Op::Remove,
                staged: None,
                backup: None,
                old: link_meta(Some(c.link_owner)),
                new: None,
                link: None,
                old_link: link.clone(),
            },
        }
    });
    links.chain(absent)
}

/// The envelope format of `journal`: 1 unless it records links (see
/// [`JournalEntry::uses_links`]).
fn journal_format(journal: &Journal) -> u64 {
    if journal.accounts.is_some() || journal.packages.is_some() {
        crate::effects::state::STATE_FORMAT_ACCOUNTS
    } else if journal
        .entries
        .iter()
        .any(|e| e.uses_links() || e.uses_directories())
    {
        crate::effects::state::STATE_FORMAT_RESOURCES
    } else {
        crate::effects::state::STATE_FORMAT
    }
}

/// Steps 1–2: save originals, back up, stage, as the journal's intent says.
fn prepare(
    fs: &RootFs,
    state: &StateDir,
    plan: &Plan,
    backups: &Path,
    journal: &mut Journal,
    dirs: &mut BTreeMap<String, OwnedFd>,
    keep_saved: bool,
) -> Result<()> {
    let backups_fd = open_state_subdir(backups)?;
    // Managed directories first: files may be staged inside them.
    prepare_dirs(fs, plan, journal, dirs)?;
    let bar = crate::progress::bar(plan.changes.len() as u64, "staging files");
    for (c, e) in plan.changes.iter().zip(journal.entries.clone()) {
        bar.inc(1);
        let key = parent_key(&c.path);
        if !dirs.contains_key(&key) {
            let dir = fs
                .open_parent(
                    &c.path,
                    Some(MkParents {
                        created: &mut journal.created_dirs,
                        mode: c
                            .after
                            .as_ref()
                            .map_or(crate::desired::spec::Mode::DEFAULT_DIR.0, |a| a.dir_mode),
                    }),
                )?
                .ok_or_else(|| anyhow!("cannot open the directory of {}", c.path))?;
            dirs.insert(key.clone(), dir);
        }
        let dir = &dirs[&key];
        let name = c.path.file_name();
        let display = fs.display(&c.path);
        if c.adopt_original {
            save_original(state, c, keep_saved)?;
        }
        if let (Some(backup), Some(before)) = (&e.backup, &c.before) {
            backup_target(dir, name, &backups_fd, backup, &before.content)
                .with_context(|| format!("cannot back up {display}"))?;
        }
        if let (Some(tmp), Some(new)) = (&e.staged, e.new) {
            // Borrowed from the plan, not copied (10,000 copies in a cold
            // apply): only a restored original is read here.
            let content: std::borrow::Cow<'_, [u8]> = match &c.restore_original {
                Some(orig) if c.kind == ChangeKind::Remove => {
                    originals::read_verified(state, &orig.stored, c.path.as_str(), &display)?.into()
                }
                _ => c
                    .after
                    .as_ref()
                    .context("plan change without new content")?
                    .content
                    .as_slice()
                    .into(),
            };
            stage(
                dir,
                tmp,
                &content,
                new.mode,
                (new.uid, new.gid),
                journal.ownership,
            )
            .with_context(|| format!("cannot stage the new {display}"))?;
        }
    }
    prepare_paths(fs, plan, &backups_fd, journal, dirs)
}

/// Step 1–2 for the links and absent paths (the entries after the
/// files'): a link is staged as a symlink at its staged name; a regular
/// file to remove is backed up like a file's previous content (a symlink
/// needs no backup: the journal holds its target).
fn prepare_paths(
    fs: &RootFs,
    plan: &Plan,
    backups_fd: &OwnedFd,
    journal: &mut Journal,
    dirs: &mut BTreeMap<String, OwnedFd>,
) -> Result<()> {
    let entries = journal.entries[plan.changes.len()..].to_vec();
    let dir_modes = plan
        .links
        .iter()
        .map(|c| c.dir_mode)
        .chain(plan.absent.iter().map(|_| 0));
    let absent_files = plan
        .links
        .iter()
        .map(|_| None)
        .chain(plan.absent.iter().map(|c| c.file.as_ref()));
    for ((e, dir_mode), before) in entries.iter().zip(dir_modes).zip(absent_files) {
        let key = parent_key(&e.path);
        let display = fs.display(&e.path);
        if !dirs.contains_key(&key) {
            let mk = (e.op == Op::Link).then_some(MkParents {
                created: &mut journal.created_dirs,
                mode: dir_mode,
            });
            let dir = fs
                .open_parent(&e.path, mk)?
                .ok_or_else(|| anyhow!("{display}: its directory is gone since the plan"))?;
            dirs.insert(key.clone(), dir);
        }
        let dir = &dirs[&key];
        if let (Some(backup), Some(before)) = (&e.backup, before) {
            backup_target(dir, e.path.file_name(), backups_fd, backup, &before.content)
                .with_context(|| format!("cannot back up {display}"))?;
        }
        if let (Op::Link, Some(tmp), Some(target)) = (e.op, &e.staged, &e.link) {
            nix::unistd::symlinkat(target.as_str(), dir, tmp.as_str())
                .with_context(|| format!("cannot stage the link {display} -> {target}"))?;
        }
    }
    Ok(())
}

/// Step 1–2 for the managed directories (the last entries): a missing one
/// is made at its staged name with its owner and mode, then renamed into
/// place (never over anything: `RENAME_NOREPLACE`), so it appears whole;
/// one to correct only has its parent opened (corrected in the switch).
fn prepare_dirs(
    fs: &RootFs,
    plan: &Plan,
    journal: &mut Journal,
    dirs: &mut BTreeMap<String, OwnedFd>,
) -> Result<()> {
    let first = plan.changes.len() + plan.links.len() + plan.absent.len();
    let entries = journal.entries[first..].to_vec();
    let changes = plan.dirs.iter().filter(|c| c.action != DirAction::Remove);
    for (e, c) in entries.iter().zip(changes) {
        let key = parent_key(&e.path);
        let display = fs.display(&e.path);
        if !dirs.contains_key(&key) {
            let mk = (e.op == Op::Mkdir).then_some(MkParents {
                created: &mut journal.created_dirs,
                mode: c.dir_mode,
            });
            let dir = fs
                .open_parent(&e.path, mk)?
                .ok_or_else(|| anyhow!("{display}: its parent directory is gone since the plan"))?;
            dirs.insert(key.clone(), dir);
        }
        let (Op::Mkdir, Some(tmp), Some(new)) = (e.op, &e.staged, e.new) else {
            continue;
        };
        let dir = &dirs[&key];
        make_dir_whole(dir, tmp, e.path.file_name(), new, journal.ownership)
            .with_context(|| format!("cannot create the directory {display}"))?;
    }
    Ok(())
}

/// Makes the directory `name` in `dir` with `meta`, atomically: created
/// as `tmp` (owner only), owner and mode set, renamed to `name` unless
/// something is there.
fn make_dir_whole(dir: &OwnedFd, tmp: &str, name: &str, meta: Meta, ownership: bool) -> Result<()> {
    nix::sys::stat::mkdirat(dir, tmp, NixMode::from_bits_truncate(0o700))?;
    set_dir_meta(dir, tmp, meta, ownership)?;
    nix::fcntl::renameat2(
        dir,
        tmp,
        dir,
        name,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    )
    .with_context(|| "something appeared at its path since the plan")?;
    Ok(())
}

/// Sets owner (when `ownership`) and mode of the directory `name`,
/// opened without following a symlink (a symlink there fails: `ELOOP`,
/// a non-directory: `ENOTDIR`).
fn set_dir_meta(dir: &impl AsFd, name: &str, meta: Meta, ownership: bool) -> Result<()> {
    let fd = openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        NixMode::empty(),
    )?;
    if ownership {
        fchown(
            &fd,
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
        )?;
    }
    fchmod(&fd, NixMode::from_bits_truncate(meta.mode))?;
    Ok(())
}

/// Backs `name` up as `backup`: a hard link (free), or a copy of
/// `content` across filesystems.
fn backup_target(
    dir: &OwnedFd,
    name: &str,
    backups_fd: &OwnedFd,
    backup: &str,
    content: &[u8],
) -> Result<()> {
    match linkat(dir, name, backups_fd, backup, AtFlags::empty()) {
        Ok(()) => Ok(()),
        Err(Errno::EXDEV) | Err(Errno::EPERM) => {
            write_new_file(backups_fd, backup, content, 0o600).map(|_| ())
        }
        Err(err) => Err(err.into()),
    }
}

/// The saved originals `plan` takes over where no verified copy is kept
/// yet: what this transaction's undo removes again.
fn new_originals(state: &StateDir, plan: &Plan) -> Vec<String> {
    plan.changes
        .iter()
        .filter(|c| c.adopt_original && c.before.is_some())
        .filter_map(|c| {
            let stored = crate::plan::sha256_hex(c.path.as_str().as_bytes());
            match originals::verify(state, &stored, c.path.as_str()) {
                Ok(Some(_)) => None,
                _ => Some(stored),
            }
        })
        .collect()
}

/// A released file gets back the mode and owner recorded with its saved
/// original, where the record has them, rather than the inventory's:
/// those of a rebuilt inventory are what driftless wrote.
fn restore_with_saved_meta(state: &StateDir, plan: &mut Plan) {
    for c in &mut plan.changes {
        if c.kind != ChangeKind::Remove {
            continue;
        }
        if let Some(o) = c.restore_original.as_mut() {
            if let Some(m) = originals::saved_meta(state, &o.stored, c.path.as_str()) {
                (o.mode, o.uid, o.gid) = (m.mode, m.uid, m.gid);
            }
        }
    }
}

/// Saves the pre-driftless content of a file once, durably and verified
/// (see [`originals`]); never overwrites a verified copy.
fn save_original(state: &StateDir, c: &FileChange, keep_saved: bool) -> Result<()> {
    let Some(before) = &c.before else {
        return Ok(());
    };
    let stored = crate::plan::sha256_hex(c.path.as_str().as_bytes());
    let meta = originals::SavedMeta {
        gid: before.gid,
        mode: before.mode,
        uid: before.uid,
    };
    originals::save(
        state,
        &stored,
        c.path.as_str(),
        &before.content,
        Some(meta),
        keep_saved,
    )
    .with_context(|| format!("cannot save the original of {}", c.path))
}

fn open_dir_path(path: &Path) -> Result<OwnedFd> {
    nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        NixMode::empty(),
    )
    .with_context(|| format!("cannot open {}", path.display()))
}

/// [`open_dir_path`] of a directory inside the state directory (a
/// transaction's, its backups): never through a symlink planted there.
fn open_state_subdir(path: &Path) -> Result<OwnedFd> {
    nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        NixMode::empty(),
    )
    .with_context(|| format!("cannot open {}", path.display()))
}

/// Creates `name` (must not exist) in `dir` with `content` and `mode`.
fn write_new_file(dir: &impl AsFd, name: &str, content: &[u8], mode: u32) -> Result<fs::File> {
    let f = write_new_private(dir, name, content)?;
    fchmod(&f, NixMode::from_bits_truncate(mode))?;
    Ok(f)
}

/// Creates `name` (must not exist) in `dir` with `content`, readable by
/// its owner at most (0600 less the umask) until the caller sets a mode.
fn write_new_private(dir: &impl AsFd, name: &str, content: &[u8]) -> Result<fs::File> {
    let fd = openat(
        dir,
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        NixMode::from_bits_truncate(0o600),
    )?;
    let mut f = fs::File::from(fd);
    f.write_all(content)?;
    Ok(f)
}

/// Writes a staged file with its final owner and mode (owner first:
/// chown clears set-id bits).
fn stage(
    dir: &impl AsFd,
    tmp: &str,
    content: &[u8],
    mode: u32,
    ids: (u32, u32),
    ownership: bool,
) -> Result<()> {
    let f = write_new_private(dir, tmp, content)?;
    if ownership {
        fchown(&f, Some(Uid::from_raw(ids.0)), Some(Gid::from_raw(ids.1)))
            .context("cannot set owner")?;
    }
    fchmod(&f, NixMode::from_bits_truncate(mode)).context("cannot set mode")?;
    Ok(())
}

/// One `syncfs` per filesystem holding a touched directory or the state.
fn flush(fs: &RootFs, state: &StateDir, dirs: &BTreeMap<String, OwnedFd>) -> Result<()> {
    let state_fd = open_dir_path(state.path())?;
    syncfs_each(
        dirs.values()
            .map(|d| d.as_fd())
            .chain([fs.fd().as_fd(), state_fd.as_fd()]),
    )
}

/// Step 5: make the staged state live.
fn switch(journal: &Journal, dirs: &BTreeMap<String, OwnedFd>, opts: &ApplyOptions) -> Result<()> {
    let mut done = 0usize;
    let bar = crate::progress::bar(journal.entries.len() as u64, "switching in");
    for e in &journal.entries {
        bar.inc(1);
        let dir = &dirs[&parent_key(&e.path)];
        let name = e.path.file_name();
        match e.op {
            // Made whole while preparing.
            Op::Adopt | Op::Mkdir => continue,
            Op::DirMeta => {
                let new = e.new.context("journal entry without new metadata")?;
                set_dir_meta(dir, name, new, journal.ownership).with_context(|| {
                    format!("cannot change owner/mode of the directory {}", e.path)
                })?;
            }
            Op::Replace | Op::Link => {
                let tmp = e
                    .staged
                    .as_deref()
                    .context("journal entry without staged file")?;
                renameat(dir, tmp, dir, name)
                    .with_context(|| format!("cannot rename into {}", e.path))?;
            }
            Op::Meta => {
                let new = e.new.context("journal entry without new metadata")?;
                set_meta(dir, name, new, journal.ownership)
                    .with_context(|| format!("cannot change owner/mode of {}", e.path))?;
            }
            Op::Remove => match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(err) => return Err(err).with_context(|| format!("cannot remove {}", e.path)),
            },
        }
        done += 1;
        failpoint::hit("apply.switch")?;
        if opts.crash_after == Some(done) {
            eprintln!("driftless: test hook: crashing after {done} operation(s)");
            std::process::abort();
        }
    }
    Ok(())
}

fn set_meta(dir: &impl AsFd, name: &str, meta: Meta, ownership: bool) -> Result<()> {
    let fd = openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        NixMode::empty(),
    )?;
    if ownership {
        fchown(
            &fd,
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
        )?;
    }
    fchmod(&fd, NixMode::from_bits_truncate(meta.mode))?;
    Ok(())
}

/// Undoes every entry of `journal`, idempotently: safe to run again after
/// a crash in the middle of it.
fn rollback(fs: &RootFs, state: &StateDir, journal: &mut Journal) -> Result<()> {
    rollback_then(fs, state, journal, None)
}

/// [`rollback`], and with `inventory`, puts that inventory back before the
/// journal says `RolledBack` (a crash between the two must not leave an
/// inventory naming files that are gone).
fn rollback_then(
    fs: &RootFs,
    state: &StateDir,
    journal: &mut Journal,
    inventory: Option<&Inventory>,
) -> Result<()> {
    let tx_dir = state.tx_dir().join(&journal.txid);
    let backups = open_state_subdir(&tx_dir.join("backups"))?;
    let mut dirs: BTreeMap<String, OwnedFd> = BTreeMap::new();
    let mut errors = Vec::new();
    for e in journal.entries.iter().rev() {
        let key = parent_key(&e.path);
        if !dirs.contains_key(&key) {
            match fs.open_parent(&e.path, None) {
                Ok(Some(d)) => {
                    dirs.insert(key.clone(), d);
                }
                Ok(None) => continue, // directory gone: nothing of ours is in it
                Err(err) => {
                    errors.push(format!("{}: {err:#}", e.path));
                    continue;
                }
            }
        }
        let dir = &dirs[&key];
        failpoint::hit("apply.undo")?;
        let result = if journal.state == TxState::Preparing {
            // No target was touched yet: only staged files to delete (a
            // created directory is removed with the others below).
            match &e.staged {
                Some(tmp) if e.op == Op::Mkdir => remove_empty_dir(dir, tmp),
                Some(tmp) => match unlinkat(dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir) {
                    Ok(()) | Err(Errno::ENOENT) => Ok(()),
                    Err(err) => Err(err.into()),
                },
                None => Ok(()),
            }
        } else {
            undo_entry(dir, &backups, e, &journal.txid, journal.ownership)
        };
        if let Err(err) = result {
            errors.push(format!("{}: {err:#}", fs.display(&e.path)));
        }
    }
    // Directories created for files and managed directories created,
    // deepest first, if empty (something else may have been put there).
    let mut made: Vec<&TargetPath> = journal
        .entries
        .iter()
        .filter(|e| e.op == Op::Mkdir)
        .map(|e| &e.path)
        .chain(journal.created_dirs.iter())
        .collect();
    made.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in made {
        if let Ok(Some(parent)) = fs.open_parent(d, None) {
            match unlinkat(&parent, d.file_name(), UnlinkatFlags::RemoveDir) {
                // ENOTDIR: a symlink or file took its place; not ours.
                Ok(())
                | Err(Errno::ENOENT)
                | Err(Errno::ENOTEMPTY)
                | Err(Errno::EEXIST)
                | Err(Errno::ENOTDIR) => {}
                Err(err) => {
                    errors.push(format!("{}: cannot remove directory: {err}", fs.display(d)))
                }
            }
        }
    }
    if !errors.is_empty() {
        bail!(
            "rollback of transaction {} incomplete:\n  {}",
            journal.txid,
            errors.join("\n  ")
        );
    }
    // Packages, then accounts: the files the transaction gave them are
    // gone now.
    let packages_started = tx_dir.join(crate::effects::packages::STARTED).exists();
    if let Some(record) = journal.packages.as_ref().filter(|_| packages_started) {
        failpoint::hit("apply.undo.packages")?;
        match crate::effects::packages::undo(record, &tx_dir.join("debs")) {
            Ok(kept) => journal.kept.extend(kept),
            // A lock of dpkg or apt held by another program: not a
            // failure of the undo, only a wait (anything else counts).
            Err(e) if crate::effects::packages::must_wait(&e) => {
                return Err(e.context(format!(
                    "cannot put back the packages of transaction {} yet; the next run tries again",
                    journal.txid
                )));
            }
            Err(e) => {
                // Tried again by the next runs, but not forever: a dpkg
                // that keeps failing must not stop the agent from ever
                // applying the fix.
                let tries = (1..=PACKAGE_UNDO_TRIES)
                    .find(|n| !tx_dir.join(format!("packages-undo-failed.{n}")).exists())
                    .unwrap_or(PACKAGE_UNDO_TRIES);
                if let Ok(fd) = open_state_subdir(&tx_dir) {
                    let _ = mark(&fd, &format!("packages-undo-failed.{tries}"));
                }
                if tries < PACKAGE_UNDO_TRIES {
                    return Err(e.context(format!(
                        "cannot put back the packages of transaction {} (attempt {tries} of {PACKAGE_UNDO_TRIES}); the next run tries again",
                        journal.txid
                    )));
                }
                tracing::error!(txid = %journal.txid, "packages not put back after {tries} attempts, given up: {e:#}; check `dpkg --audit` and `apt-get -f install`");
                journal.kept.push(format!(
                    "packages not put back after {tries} attempts ({e:#}): check `dpkg --audit` and `apt-get -f install`"
                ));
            }
        }
    }
    let started = tx_dir.join(ACCOUNTS_STARTED).exists();
    if let Some(record) = journal.accounts.as_ref().filter(|_| started) {
        failpoint::hit("apply.undo.accounts")?;
        let mut watched = match inventory {
            Some(inv) => watched_paths(fs, inv),
            None => watched_paths(fs, state.inventory()?.as_ref()),
        };
        // What of the transaction survived its undo (a created directory
        // something was put in) is looked into too.
        let mut scanned: Vec<PathBuf> = journal
            .entries
            .iter()
            .map(|e| &e.path)
            .chain(journal.created_dirs.iter())
            .map(|p| fs.path().join(p.as_str().trim_start_matches('/')))
            .collect();
        scanned.sort();
        scanned.dedup();
        watched.extend(scanned.iter().cloned());
        let kept =
            crate::effects::accounts::undo(fs, record, &watched, &scanned).with_context(|| {
                format!(
                    "cannot undo the accounts of transaction {}; the next run tries again",
                    journal.txid
                )
            })?;
        journal.kept.extend(kept);
    }
    flush(fs, state, &dirs)?;
    if let Some(inv) = inventory {
        failpoint::hit("apply.revert.inventory")?;
        state.save_inventory(inv)?;
    }
    // (Before the journal says so: a crash in between retires them again.)
    for stored in &journal.saved_originals {
        originals::retire(state, stored);
    }
    journal.state = TxState::RolledBack;
    crate::effects::state::write_state_atomic(
        &tx_dir.join(JOURNAL),
        journal,
        journal_format(journal),
    )?;
    Ok(())
}

/// The paths `inv` manages, on the host: an account that owns one of them
/// is not removed by an undo.
fn watched_paths(fs: &RootFs, inv: &Inventory) -> Vec<PathBuf> {
    inv.files
        .keys()
        .chain(inv.directories.keys())
        .chain(inv.dirs.iter())
        .map(|p| fs.path().join(p.as_str().trim_start_matches('/')))
        .collect()
}

fn undo_entry(
    dir: &OwnedFd,
    backups: &OwnedFd,
    e: &JournalEntry,
    txid: &str,
    ownership: bool,
) -> Result<()> {
    let name = e.path.file_name();
    match e.op {
        Op::Adopt => Ok(()),
        // The staged name (a crash before its rename), if still there;
        // the directory itself is removed, if empty, after every entry.
        Op::Mkdir => match &e.staged {
            Some(tmp) => remove_empty_dir(dir, tmp),
            None => Ok(()),
        },
        Op::DirMeta => match e.old {
            Some(old) => match set_dir_meta(dir, name, old, ownership) {
                Ok(()) => Ok(()),
                Err(err) if is_enoent(&err) => Ok(()),
                Err(err) => Err(err),
            },
            None => Ok(()),
        },
        Op::Meta => match e.old {
            Some(old) => match set_meta(dir, name, old, ownership) {
                Ok(()) => Ok(()),
                Err(err) if is_enoent(&err) => Ok(()),
                Err(err) => Err(err),
            },
            None => Ok(()),
        },
        Op::Replace | Op::Remove | Op::Link => {
            if let Some(tmp) = &e.staged {
                match unlinkat(dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir) {
                    // Still staged: the rename never happened; the target is untouched.
                    Ok(()) => return Ok(()),
                    Err(Errno::ENOENT) => {}
                    Err(err) => return Err(err.into()),
                }
            }
            if let Some(target) = &e.old_link {
                return restore_link(dir, name, target, e.old, txid, ownership);
            }
            match (&e.backup, e.old) {
                (Some(backup), Some(old)) => {
                    restore_backup(dir, backups, backup, name, txid, old, ownership)
                }
                // The target did not exist before: remove what we put there.
                _ => match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
                    Ok(()) | Err(Errno::ENOENT) => Ok(()),
                    Err(err) => Err(err.into()),
                },
            }
        }
    }
}

/// Puts a symlink to `target` back at `name`, atomically (created at a
/// temp name, owner restored, renamed over). Nothing to do when it is
/// there already (a removal that had not run yet).
fn restore_link(
    dir: &OwnedFd,
    name: &str,
    target: &str,
    old: Option<Meta>,
    txid: &str,
    ownership: bool,
) -> Result<()> {
    if let Ok(now) = nix::fcntl::readlinkat(dir, name) {
        if now.as_encoded_bytes() == target.as_bytes() {
            return Ok(());
        }
    }
    let tmp = format!(
        ".driftless-restore-{}-{txid}",
        &crate::plan::sha256_hex(name.as_bytes())[..12]
    );
    match unlinkat(dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => {}
        Err(err) => return Err(err.into()),
    }
    nix::unistd::symlinkat(target, dir, tmp.as_str())
        .with_context(|| format!("cannot re-create the link to {target}"))?;
    if let (true, Some(old)) = (ownership, old) {
        nix::unistd::fchownat(
            dir,
            tmp.as_str(),
            Some(Uid::from_raw(old.uid)),
            Some(Gid::from_raw(old.gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .context("cannot set the owner of the re-created link")?;
    }
    renameat(dir, tmp.as_str(), dir, name)?;
    Ok(())
}

/// Removes the directory `name` in `dir` if it is there and empty.
fn remove_empty_dir(dir: &OwnedFd, name: &str) -> Result<()> {
    match unlinkat(dir, name, UnlinkatFlags::RemoveDir) {
        Ok(()) | Err(Errno::ENOENT) | Err(Errno::ENOTEMPTY) | Err(Errno::EEXIST) => Ok(()),
        Err(err) => Err(err.into()),
    }
}

fn is_enoent(err: &anyhow::Error) -> bool {
    err.downcast_ref::<Errno>() == Some(&Errno::ENOENT)
}

/// Puts the backed-up previous content back with its previous owner and
/// mode, atomically (link or copy to a temp name, then rename).
fn restore_backup(
    dir: &OwnedFd,
    backups: &OwnedFd,
    backup: &str,
    name: &str,
    txid: &str,
    old: Meta,
    ownership: bool,
) -> Result<()> {
    let tmp = format!(
        ".driftless-restore-{}-{txid}",
        &crate::plan::sha256_hex(name.as_bytes())[..12]
    );
    match unlinkat(dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => {}
        Err(err) => return Err(err.into()),
    }
    match linkat(backups, backup, dir, tmp.as_str(), AtFlags::empty()) {
        Ok(()) => {
            // What was linked, checked at its new name (no window between
            // a check and the link): linkat(2) links a symlink or a FIFO
            // planted in the untrusted state directory as readily as a
            // file, and renaming it over the target would put a link
            // where the file was.
            let regular = fstatat(dir, tmp.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                .map(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG)
                .context("cannot check the backup linked back")?;
            if !regular {
                let _ = unlinkat(dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
                bail!("the backup {backup} (in the transaction's backups/) is not a regular file, so the state directory was tampered with: refusing to put it back. Restore this file by hand, then move the transaction directory away");
            }
        }
        Err(Errno::EXDEV) | Err(Errno::EPERM) => copy_backup(backups, backup, dir, &tmp)?,
        Err(err) => return Err(err).context("cannot link the backup back"),
    }
    if let Err(err) = set_meta(dir, &tmp, old, ownership) {
        // Unprivileged runs cannot chown; the mode is what matters there.
        if ownership {
            return Err(err);
        }
    }
    renameat(dir, tmp.as_str(), dir, name)?;
    // rename(2) does nothing when both names are links to one inode (the
    // target was never replaced, e.g. a prune that had not run yet): the
    // target already is the backup, so drop the extra name.
    match unlinkat(dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(err) => Err(err.into()),
    }
}

/// Copies the backup `name` to the new file `tmp` in `dir` (mode 0600),
/// streamed: a backup is the previous content of any target, which may be
/// larger than memory (it was read whole, and a rollback of a large file
/// could not finish). Only a regular file, not through a link: the state
/// directory is untrusted, and a FIFO planted there would block the
/// rollback forever.
fn copy_backup(backups: &impl AsFd, name: &str, dir: &impl AsFd, tmp: &str) -> Result<()> {
    let fd = openat(
        backups,
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        NixMode::empty(),
    )
    .with_context(|| format!("cannot open the backup {name}"))?;
    let mut src = fs::File::from(fd);
    if !src.metadata()?.is_file() {
        bail!("the backup {name} (in the transaction's backups/) is not a regular file, so the state directory was tampered with: refusing to copy it back. Restore this file by hand, then move the transaction directory away");
    }
    let mut dst = write_new_file(dir, tmp, &[], 0o600)?;
    std::io::copy(&mut src, &mut dst)
        .with_context(|| format!("cannot copy the backup {name} back"))?;
    Ok(())
}

/// A transaction that [`recover`] rolled back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    pub txid: String,
    /// The commit the transaction was applying.
    pub commit: Option<String>,
    /// How far it had come: `Preparing`/`Prepared` (no target switched
    /// in yet, or only partly), `Switched` (interrupted during its unit
    /// actions or checks), `Reverting` (interrupted during a revert).
    pub phase: TxState,
    /// Set when files that units may have loaded were put back: what
    /// systemd must be told again.
    pub post: Option<PostActions>,
    /// Accounts the transaction made that its undo kept, and why.
    pub kept: Vec<String>,
    /// It was interrupted after its packages stage began (apt, or a
    /// package's maintainer script, may be what stopped the agent).
    pub packages_interrupted: bool,
}

impl Recovered {
    /// The transaction was switched in: its unit actions may have run.
    pub fn was_live(&self) -> bool {
        matches!(self.phase, TxState::Switched | TxState::Reverting)
    }
}

/// Rolls back every transaction that did not reach its commit point (a
/// crash while staging, switching, checking or reverting). Returns what
/// was rolled back. Call under the lock, before planning.
pub fn recover(fs: &RootFs, state: &StateDir) -> Result<Vec<Recovered>> {
    let inv = state.inventory()?;
    let mut recovered = Vec::new();
    for (txid, path) in list_transactions(state)? {
        let journal = match load_journal(&path) {
            Ok(j) => j,
            // A newer agent's journal is never set aside, even the
            // committed one: it may record what only that agent can undo.
            Err(e) if crate::effects::state::is_newer_format(&e) => {
                return Err(e.context(format!(
                    "cannot recover: the transaction {txid} in {} was written by a newer driftless",
                    path.display()
                )))
            }
            // A read that failed (EIO, a denial) says nothing about the
            // journal: kept, and the run stops until it reads.
            Err(e) if crate::effects::state::read_failed(&e) => {
                return Err(e.context(format!(
                    "cannot read the journal of transaction {txid} in {} (a disk or permission error?); check the disk, or move the directory away if it stays unreadable",
                    path.display()
                )))
            }
            // The committed transaction only serves a later revert: set it
            // aside and go on (issue 12 §6: it stopped the agent forever).
            Err(e) if inv.txid == txid => {
                let aside = state.path().join(format!("tx-corrupt-{txid}"));
                fs::rename(&path, &aside).with_context(|| {
                    format!("cannot move the corrupt transaction {} aside", path.display())
                })?;
                tracing::warn!(txid = %txid, moved_to = %aside.display(), "the journal of the committed transaction is corrupt ({e:#}); moved aside: this transaction can no longer be reverted as a whole");
                continue;
            }
            Err(e) => {
                return Err(e.context(format!(
                    "transaction {txid} was interrupted and its journal is unreadable, so driftless cannot tell which files it changed. \
                     Its staged files are named `.driftless-<n>-{txid}` next to their targets and its backups are in {}/backups. \
                     Compare the host with `driftless plan`, restore what is needed, then move {} away and sync again",
                    path.display(),
                    path.display()
                )))
            }
        };
        let Some(mut journal) = journal else {
            // Crashed before the intent was written: nothing was staged.
            remove_tx_dir(&path)?;
            continue;
        };
        let phase = journal.state;
        let done = |journal: &Journal| Recovered {
            txid: txid.clone(),
            commit: journal.commit.clone(),
            phase,
            post: matches!(phase, TxState::Switched | TxState::Reverting)
                .then(|| journal.post.clone())
                .flatten(),
            kept: journal.kept.clone(),
            packages_interrupted: matches!(phase, TxState::Preparing | TxState::Prepared)
                && path.join(crate::effects::packages::STARTED).exists()
                && !path.join(PACKAGES_DONE).exists(),
        };
        match phase {
            TxState::Reverting => {
                finish_revert(fs, state, &mut journal)
                    .with_context(|| format!("cannot finish the interrupted revert of {txid}"))?;
                recovered.push(done(&journal));
            }
            TxState::Preparing => {
                rollback(fs, state, &mut journal)
                    .with_context(|| format!("cannot clean up interrupted transaction {txid}"))?;
                recovered.push(done(&journal));
            }
            TxState::Prepared | TxState::Switched if inv.txid == txid => {
                // Committed, but crashed before it was marked so. The
                // inventory may not be durable yet: killed between
                // appending its record to `inventory.delta` and the
                // barrier, the record is in the page cache only, and data
                // (unlike a rename) is not ordered before the mark's
                // creation. So one barrier first (a mark that survived a
                // power loss the record did not would leave the
                // transaction neither committed nor reverted). The next
                // transaction's first flush makes the mark durable before
                // that transaction's commit could name another.
                let state_fd = open_dir_path(state.path())?;
                nix::unistd::syncfs(&state_fd)
                    .with_context(|| format!("cannot make {} durable", state.path().display()))?;
                mark(&open_dir_path(&path)?, COMMITTED)?;
            }
            TxState::Prepared | TxState::Switched => {
                // Through `finish_revert`: the inventory goes back to the
                // one before this transaction, whatever wrote it since.
                finish_revert(fs, state, &mut journal)
                    .with_context(|| format!("cannot roll back interrupted transaction {txid}"))?;
                recovered.push(done(&journal));
            }
            TxState::Committed => {}
            TxState::RolledBack => remove_tx_dir(&path)?,
        }
    }
    Ok(recovered)
}

/// Reverts the switched-in (or committed) transaction `txid` as a whole:
/// previous bytes, owner and mode back, new files removed, pruned files
/// re-created, and the previous inventory restored.
///
/// The journal is marked `Reverting` first, so a crash in the middle is
/// finished by [`recover`] on the next start.
///
/// Returns a note per account the undo kept (`accounts::undo`).
pub fn revert(fs: &RootFs, state: &StateDir, txid: &str) -> Result<Vec<String>> {
    let tx_dir = state.tx_dir().join(txid);
    let mut journal = load_journal(&tx_dir)?.with_context(|| {
        format!(
            "the journal of transaction {txid} is missing in {}",
            tx_dir.display()
        )
    })?;
    quick::clear(state)?;
    journal.state = TxState::Reverting;
    crate::effects::state::write_state_atomic(
        &tx_dir.join(JOURNAL),
        &journal,
        journal_format(&journal),
    )?;
    failpoint::hit("apply.revert.started")?;
    finish_revert(fs, state, &mut journal)?;
    Ok(journal.kept)
}

/// Rolls back a transaction and puts its previous inventory back.
fn finish_revert(fs: &RootFs, state: &StateDir, journal: &mut Journal) -> Result<()> {
    let tx_dir = state.tx_dir().join(&journal.txid);
    let before: Inventory = crate::effects::state::read_inventory_at(
        &tx_dir.join(INVENTORY_BEFORE),
        INVENTORY_BEFORE_LOG,
    )?
    .with_context(|| {
        format!(
            "the previous inventory of transaction {} is missing",
            journal.txid
        )
    })?;
    rollback_then(fs, state, journal, Some(&before))?;
    remove_tx_dir(&tx_dir)
}

fn list_transactions(state: &StateDir) -> Result<Vec<(String, PathBuf)>> {
    let dir = state.tx_dir();
    let mut out = Vec::new();
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
    };
    for e in rd {
        let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
        if let Some(name) = e.file_name().to_str() {
            // A transaction is a directory: anything else (a link planted
            // in the state directory) is not one, and never followed.
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                tracing::warn!(
                    "{} is not a transaction directory: ignored",
                    e.path().display()
                );
                continue;
            }
            if name.ends_with(REMOVED) {
                // Half removed by an interrupted `remove_tx_dir`.
                let _ = fs::remove_dir_all(e.path());
                continue;
            }
            out.push((name.to_string(), e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The suffix of a transaction directory being removed.
const REMOVED: &str = ".removed";

/// Keeps only the transaction `keep` (the latest committed).
fn prune_old_transactions(state: &StateDir, keep: &str) -> Result<()> {
    for (txid, path) in list_transactions(state)? {
        if txid != keep {
            remove_tx_dir(&path)?;
        }
    }
    // No barrier: a directory that comes back after a power loss is one
    // whose journal says `Committed` or `RolledBack`, or is marked
    // `committed` (durable since this transaction's first flush), and
    // recovery leaves it alone; the next commit prunes it again.
    Ok(())
}

/// Removes a transaction's directory: first renamed to `<txid>.removed`
/// (atomic), which no reader takes for a transaction, then deleted. Deleted
/// in place, a crash or power loss could leave a part of it: say a
/// committed transaction's `journal.json` without its `committed` mark,
/// which would read as interrupted and be rolled back.
fn remove_tx_dir(path: &Path) -> Result<()> {
    let mut gone = path.as_os_str().to_owned();
    gone.push(REMOVED);
    let gone = PathBuf::from(gone);
    let path = match fs::rename(path, &gone) {
        Ok(()) => gone.as_path(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        // Renaming failed: remove it in place, as before.
        Err(_) => path,
    };
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", path.display())),
    }
}

#[cfg(test)]
mod tests;
