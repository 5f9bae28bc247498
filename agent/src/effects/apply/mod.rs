//! Apply a plan as one transaction: every target ends up either fully old
//! or fully new, whatever instant the process dies at, and a commit counts
//! as applied only once its health checks passed and its record is durable.
//!
//! 1. **Back up** each existing target into `tx/<txid>/backups/` by hard
//!    link (free; the old inode survives the rename), or by copy across
//!    filesystems. A file taken over for the first time is also copied to
//!    `originals/` once.
//! 2. **Stage** each new file as `.driftless-<n>-<txid>` next to its
//!    target, with final owner and mode; create missing parents.
//! 3. **Journal** the transaction to `tx/<txid>/journal.json` (`Prepared`).
//! 4. **Flush** with one `syncfs` per filesystem (targets and state), not an
//!    `fsync` per file: the staged data, the backups and the journal are now
//!    durable.
//! 5. **Switch**: rename each staged file over its target, change
//!    owner/mode in place for metadata-only changes, unlink pruned files;
//!    flush again and journal `Switched` ([`apply`] returns here).
//! 6. The caller reloads units and runs the health checks. Then either
//!    **commit** ([`commit`]): atomically replace `inventory.json` with one
//!    naming this transaction (the commit point), or **revert** ([`revert`]).
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
use nix::sys::stat::{fchmod, fstat, Mode as NixMode};
use nix::unistd::{fchown, linkat, unlinkat, Gid, Uid, UnlinkatFlags};

use crate::desired::spec::TargetPath;
use crate::effects::rootfs::{MkParents, RootFs};
use crate::effects::state::{fsync_dir, quick, read_json, write_json_atomic, StateDir};
use crate::plan::inventory::Inventory;
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
const INVENTORY_BEFORE: &str = "inventory.before.json";

/// The inventory a transaction started from (kept with the latest
/// committed transaction): `None` once the transaction is pruned.
pub fn inventory_before(state: &StateDir, txid: &str) -> Result<Option<Inventory>> {
    read_json(&state.tx_dir().join(txid).join(INVENTORY_BEFORE))
}

/// Applies `plan` and commits `plan.next_inventory`. On error before the
/// commit point, the transaction is rolled back before returning.
pub fn apply(
    fs: &RootFs,
    state: &StateDir,
    plan: &Plan,
    ownership: bool,
    now: i64,
    opts: &ApplyOptions,
) -> Result<Applied> {
    let timing = crate::timings::stage("write");
    quick::clear(state)?;
    let txid = new_txid(now);
    let tx_dir = state.tx_dir().join(&txid);
    let backups = tx_dir.join("backups");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&backups)
        .with_context(|| format!("cannot create {}", backups.display()))?;
    let before = state.inventory()?;
    write_json_atomic(&tx_dir.join(INVENTORY_BEFORE), &before)?;

    let mut journal = Journal {
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
    };
    write_json_atomic(&tx_dir.join(JOURNAL), &journal)?;
    let mut dirs: BTreeMap<String, OwnedFd> = BTreeMap::new();
    let prepared = prepare(fs, state, plan, &backups, &mut journal, &mut dirs).and_then(|()| {
        failpoint::hit("apply.staged")?;
        journal.state = TxState::Prepared;
        write_json_atomic(&tx_dir.join(JOURNAL), &journal)
    });
    drop(timing);
    if let Err(e) = prepared {
        let _ = rollback(fs, state, &mut journal);
        return Err(e);
    }
    let switched = timed("flush", || flush(fs, state, &dirs))
        .and_then(|()| timed("switch", || switch(&journal, &dirs, opts)))
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
    journal.post = Some(post_actions(plan));
    let recorded = failpoint::hit("apply.switched")
        .and_then(|()| write_json_atomic(&tx_dir.join(JOURNAL), &journal));
    if let Err(e) = recorded {
        if let Err(re) = rollback(fs, state, &mut journal) {
            return Err(e.context(format!(
                "and rolling back transaction {txid} failed too: {re:#}; the next run retries the rollback"
            )));
        }
        return Err(e.context(format!("transaction {txid} rolled back")));
    }

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
    Ok(applied)
}

/// What systemd must be told after the files of `plan` change (or change
/// back).
pub fn post_actions(plan: &Plan) -> PostActions {
    PostActions {
        daemon_reload: plan
            .changes
            .iter()
            .any(|c| crate::effects::systemd::is_unit_file(c.path.as_str())),
        unit_actions: plan.unit_actions.clone(),
    }
}

/// The commit point of a switched-in transaction: replaces the inventory
/// with `next` naming `txid`, durably. Call only after the unit actions and
/// health checks passed. On error the transaction is still switched in and
/// uncommitted: the caller must [`revert`] it.
pub fn commit(fs: &RootFs, state: &StateDir, txid: &str, next: &Inventory, now: i64) -> Result<()> {
    let _t = crate::timings::stage("commit");
    let tx_dir = state.tx_dir().join(txid);
    let mut journal = read_json::<Journal>(&tx_dir.join(JOURNAL))?
        .with_context(|| format!("the journal of transaction {txid} is missing"))?;
    if journal.state != TxState::Switched {
        bail!(
            "transaction {txid} is {:?}, not switched in: it cannot be committed",
            journal.state
        );
    }
    let mut inv: Inventory = next.clone();
    inv.txid = txid.to_string();
    inv.applied_at = now;
    inv.dirs.extend(journal.created_dirs.iter().cloned());
    failpoint::hit("apply.commit.inventory")?;
    write_json_atomic(&state.inventory_path(), &inv)
        .context("cannot record the applied commit in the inventory")?;
    // Committed from here on: the inventory names the transaction, and
    // recovery treats it as committed whatever its journal says.
    failpoint::hit("apply.commit.journal")?;
    journal.state = TxState::Committed;
    write_json_atomic(&tx_dir.join(JOURNAL), &journal)?;
    prune_old_transactions(state, txid)?;
    // Files released (their originals restored): the copies are done.
    for stored in &journal.released_originals {
        originals::retire(state, stored);
    }
    remove_unneeded_dirs(fs, state, &mut inv);
    Ok(())
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
        if let Err(e) = write_json_atomic(&state.inventory_path(), &*inv) {
            tracing::warn!("cannot update the inventory after removing directories: {e:#}");
        }
    }
}

fn timed<T>(stage: &'static str, f: impl FnOnce() -> T) -> T {
    let _t = crate::timings::stage(stage);
    f()
}

fn new_txid(now: i64) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{now}-{:08x}-{}", nanos, std::process::id())
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
            }
        })
        .collect()
}

/// Steps 1–2: save originals, back up, stage, as the journal's intent says.
fn prepare(
    fs: &RootFs,
    state: &StateDir,
    plan: &Plan,
    backups: &Path,
    journal: &mut Journal,
    dirs: &mut BTreeMap<String, OwnedFd>,
) -> Result<()> {
    let backups_fd = open_dir_path(backups)?;
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
            save_original(state, c)?;
        }
        if let (Some(backup), Some(before)) = (&e.backup, &c.before) {
            match linkat(dir, name, &backups_fd, backup.as_str(), AtFlags::empty()) {
                Ok(()) => {}
                Err(Errno::EXDEV) | Err(Errno::EPERM) => {
                    write_new_file(&backups_fd, backup, &before.content, 0o600)
                        .with_context(|| format!("cannot back up {display}"))?;
                }
                Err(err) => return Err(err).with_context(|| format!("cannot back up {display}")),
            }
        }
        if let (Some(tmp), Some(new)) = (&e.staged, e.new) {
            let content = match &c.restore_original {
                Some(orig) if c.kind == ChangeKind::Remove => {
                    originals::read_verified(state, &orig.stored, c.path.as_str(), &display)?
                }
                _ => c
                    .after
                    .as_ref()
                    .context("plan change without new content")?
                    .content
                    .clone(),
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
    Ok(())
}

/// Saves the pre-driftless content of a file once, durably and verified
/// (see [`originals`]); never overwrites a verified copy.
fn save_original(state: &StateDir, c: &FileChange) -> Result<()> {
    let Some(before) = &c.before else {
        return Ok(());
    };
    let stored = crate::plan::sha256_hex(c.path.as_str().as_bytes());
    originals::save(state, &stored, c.path.as_str(), &before.content)
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

/// Creates `name` (must not exist) in `dir` with `content` and `mode`.
fn write_new_file(dir: &impl AsFd, name: &str, content: &[u8], mode: u32) -> Result<fs::File> {
    let fd = openat(
        dir,
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        NixMode::from_bits_truncate(0o600),
    )?;
    let mut f = fs::File::from(fd);
    f.write_all(content)?;
    fchmod(&f, NixMode::from_bits_truncate(mode))?;
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
    let f = write_new_file(dir, tmp, content, 0o600)?;
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
    let mut seen = std::collections::BTreeSet::new();
    let all = dirs
        .values()
        .map(|d| d.as_fd())
        .chain([fs.fd().as_fd(), state_fd.as_fd()]);
    for fd in all {
        let dev = fstat(fd).context("cannot stat a directory")?.st_dev;
        if seen.insert(dev) {
            nix::unistd::syncfs(fd).context("syncfs failed")?;
        }
    }
    Ok(())
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
            Op::Adopt => continue,
            Op::Replace => {
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
    let backups = open_dir_path(&tx_dir.join("backups"))?;
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
            // No target was touched yet: only staged files to delete.
            match &e.staged {
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
    for d in journal.created_dirs.iter().rev() {
        if let Ok(Some(parent)) = fs.open_parent(d, None) {
            match unlinkat(&parent, d.file_name(), UnlinkatFlags::RemoveDir) {
                Ok(()) | Err(Errno::ENOENT) | Err(Errno::ENOTEMPTY) => {}
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
    flush(fs, state, &dirs)?;
    if let Some(inv) = inventory {
        failpoint::hit("apply.revert.inventory")?;
        write_json_atomic(&state.inventory_path(), inv)?;
    }
    journal.state = TxState::RolledBack;
    write_json_atomic(&tx_dir.join(JOURNAL), journal)?;
    Ok(())
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
        Op::Meta => match e.old {
            Some(old) => match set_meta(dir, name, old, ownership) {
                Ok(()) => Ok(()),
                Err(err) if is_enoent(&err) => Ok(()),
                Err(err) => Err(err),
            },
            None => Ok(()),
        },
        Op::Replace | Op::Remove => {
            if let Some(tmp) = &e.staged {
                match unlinkat(dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir) {
                    // Still staged: the rename never happened; the target is untouched.
                    Ok(()) => return Ok(()),
                    Err(Errno::ENOENT) => {}
                    Err(err) => return Err(err.into()),
                }
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
        Ok(()) => {}
        Err(Errno::EXDEV) | Err(Errno::EPERM) => {
            let content = read_at(backups, backup)?;
            write_new_file(dir, &tmp, &content, 0o600)?;
        }
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

fn read_at(dir: &impl AsFd, name: &str) -> Result<Vec<u8>> {
    use std::io::Read;
    let fd = openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        NixMode::empty(),
    )?;
    let mut out = Vec::new();
    fs::File::from(fd).read_to_end(&mut out)?;
    Ok(out)
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
        let journal = match read_json::<Journal>(&path.join(JOURNAL)) {
            Ok(j) => j,
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
                     Its staged files are named `.<file>.driftless-{txid}` next to their targets and its backups are in {}/backups. \
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
                // Committed, but crashed before the journal said so.
                journal.state = TxState::Committed;
                write_json_atomic(&path.join(JOURNAL), &journal)?;
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
pub fn revert(fs: &RootFs, state: &StateDir, txid: &str) -> Result<()> {
    let tx_dir = state.tx_dir().join(txid);
    let mut journal = read_json::<Journal>(&tx_dir.join(JOURNAL))?.with_context(|| {
        format!(
            "the journal of transaction {txid} is missing in {}",
            tx_dir.display()
        )
    })?;
    quick::clear(state)?;
    journal.state = TxState::Reverting;
    write_json_atomic(&tx_dir.join(JOURNAL), &journal)?;
    failpoint::hit("apply.revert.started")?;
    finish_revert(fs, state, &mut journal)
}

/// Rolls back a transaction and puts its previous inventory back.
fn finish_revert(fs: &RootFs, state: &StateDir, journal: &mut Journal) -> Result<()> {
    let tx_dir = state.tx_dir().join(&journal.txid);
    let before: Inventory = read_json(&tx_dir.join(INVENTORY_BEFORE))?.with_context(|| {
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
            out.push((name.to_string(), e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Keeps only the transaction `keep` (the latest committed).
fn prune_old_transactions(state: &StateDir, keep: &str) -> Result<()> {
    for (txid, path) in list_transactions(state)? {
        if txid != keep {
            remove_tx_dir(&path)?;
        }
    }
    fsync_dir(&state.tx_dir())
}

fn remove_tx_dir(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", path.display())),
    }
}

#[cfg(test)]
mod tests;
