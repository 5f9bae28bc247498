//! Staging and switching: every new file written under a temporary name
//! beside its target, backups taken, directories prepared, originals
//! saved, and then the renames that switch the host to the new state
//! (the flushes around them are `apply_with`'s). Also the open and write
//! helpers the rest of the transaction uses: state directories opened
//! without following links, new files written whole, owner and mode set
//! on what a name holds now.

use super::*;

/// Steps 1–2: save originals, back up, stage, as the journal's intent says.
pub(super) fn prepare(
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
pub(super) fn set_dir_meta(dir: &impl AsFd, name: &str, meta: Meta, ownership: bool) -> Result<()> {
    set_meta_opened(dir, name, OFlag::O_DIRECTORY, meta, ownership)
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
pub(super) fn new_originals(state: &StateDir, plan: &Plan) -> Vec<String> {
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
pub(super) fn restore_with_saved_meta(state: &StateDir, plan: &mut Plan) {
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

pub(super) fn open_dir_path(path: &Path) -> Result<OwnedFd> {
    nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        NixMode::empty(),
    )
    .with_context(|| format!("cannot open {}", path.display()))
}

/// [`open_dir_path`] of a directory inside the state directory (a
/// transaction's, its backups): never through a symlink planted there.
pub(super) fn open_state_subdir(path: &Path) -> Result<OwnedFd> {
    nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        NixMode::empty(),
    )
    .with_context(|| format!("cannot open {}", path.display()))
}

/// Creates `name` (must not exist) in `dir` with `content` and `mode`.
pub(super) fn write_new_file(
    dir: &impl AsFd,
    name: &str,
    content: &[u8],
    mode: u32,
) -> Result<fs::File> {
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
pub(super) fn stage(
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
pub(super) fn flush(fs: &RootFs, state: &StateDir, dirs: &BTreeMap<String, OwnedFd>) -> Result<()> {
    let state_fd = open_dir_path(state.path())?;
    syncfs_each(
        dirs.values()
            .map(|d| d.as_fd())
            .chain([fs.fd().as_fd(), state_fd.as_fd()]),
    )
}

/// Step 5: make the staged state live.
pub(super) fn switch(
    journal: &Journal,
    dirs: &BTreeMap<String, OwnedFd>,
    opts: &ApplyOptions,
) -> Result<()> {
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

/// Sets owner (when `ownership`) and mode of the file `name`, opened
/// without following a symlink and without blocking (a FIFO planted
/// there does not hang the agent).
pub(super) fn set_meta(dir: &impl AsFd, name: &str, meta: Meta, ownership: bool) -> Result<()> {
    set_meta_opened(dir, name, OFlag::O_NONBLOCK, meta, ownership)
}

/// [`set_meta`] and [`set_dir_meta`]: `name` opened read-only, never
/// through a symlink, with `flags` besides.
fn set_meta_opened(
    dir: &impl AsFd,
    name: &str,
    flags: OFlag,
    meta: Meta,
    ownership: bool,
) -> Result<()> {
    let fd = openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | flags,
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
