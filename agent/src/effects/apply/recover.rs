//! After a crash and on demand: transactions left half done are rolled
//! back or finished as their journal says ([`recover()`]), a committed one
//! reverted ([`revert`]), old ones pruned.

use super::*;

/// A transaction that [`recover()`] rolled back.
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
/// finished by [`recover()`] on the next start.
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
pub(super) fn prune_old_transactions(state: &StateDir, keep: &str) -> Result<()> {
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
