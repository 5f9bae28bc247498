//! Rolling a transaction back (a revert, a failed check, recovery): each
//! journal entry undone in reverse (files from the backups the stage took,
//! links re-created from their old targets, owners and modes set back),
//! then the packages and accounts stages undone, the inventory put back
//! and the originals the transaction released retired.

use super::*;

/// Undoes every entry of `journal`, idempotently: safe to run again after
/// a crash in the middle of it.
pub(super) fn rollback(fs: &RootFs, state: &StateDir, journal: &mut Journal) -> Result<()> {
    rollback_then(fs, state, journal, None)
}

/// [`rollback`], and with `inventory`, puts that inventory back before the
/// journal says `RolledBack` (a crash between the two must not leave an
/// inventory naming files that are gone).
pub(super) fn rollback_then(
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
        // (Gone since: nothing to give its old owner and mode back to.)
        Op::DirMeta | Op::Meta => match e.old {
            Some(old) => {
                let set = if e.op == Op::DirMeta {
                    set_dir_meta
                } else {
                    set_meta
                };
                match set(dir, name, old, ownership) {
                    Err(err) if !is_enoent(&err) => Err(err),
                    _ => Ok(()),
                }
            }
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
    let tmp = restore_temp(dir, name, txid)?;
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

/// The temporary name beside `name` that a restore writes to before its
/// rename, a leftover of an earlier attempt (a crash during recovery)
/// removed first.
fn restore_temp(dir: &OwnedFd, name: &str, txid: &str) -> Result<String> {
    let tmp = format!(
        ".driftless-restore-{}-{txid}",
        &crate::plan::sha256_hex(name.as_bytes())[..12]
    );
    match unlinkat(dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(tmp),
        Err(err) => Err(err.into()),
    }
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
pub(super) fn restore_backup(
    dir: &OwnedFd,
    backups: &OwnedFd,
    backup: &str,
    name: &str,
    txid: &str,
    old: Meta,
    ownership: bool,
) -> Result<()> {
    let tmp = restore_temp(dir, name, txid)?;
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
pub(super) fn copy_backup(
    backups: &impl AsFd,
    name: &str,
    dir: &impl AsFd,
    tmp: &str,
) -> Result<()> {
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
